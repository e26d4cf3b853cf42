// sdonnx web page: plain JS over the server's A1111 API (/sdapi/v1); no build step.
"use strict";

const API = "/sdapi/v1";
const $ = (id) => document.getElementById(id);
const PAINT_BOX = [512, 512]; // the mask painter's display size, whatever the image's own size
let initImage = null; // data URL of the img2img image
let maskPainted = false;
let pngInfo = null; // {image: data URL, parameters} of the PNG info tab

// infotext key (A1111's, as /png-info parses it) -> form field, for "Reuse parameters" and "Send to"
const PASTE = {
  prompt: "Prompt", negative_prompt: "Negative prompt", steps: "Steps", sampler_name: "Sampler",
  scheduler: "Schedule type", cfg_scale: "CFG scale", seed: "Seed", width: "Size-1", height: "Size-2",
  clip_skip: "Clip skip", subseed: "Variation seed", subseed_strength: "Variation seed strength",
  seed_resize_from_w: "Seed resize from-1", seed_resize_from_h: "Seed resize from-2", hr_scale: "Hires upscale",
  hr_second_pass_steps: "Hires steps", hr_upscaler: "Hires upscaler", hr_resize_x: "Hires resize-1",
  hr_resize_y: "Hires resize-2", hr_sampler_name: "Hires sampler", hr_scheduler: "Hires schedule type",
  hr_prompt: "Hires prompt", hr_negative_prompt: "Hires negative prompt", refiner_switch_at: "Refiner switch at",
  mask_blur: "Mask blur", inpaint_full_res_padding: "Masked area padding",
};
// A1111's values when the infotext does not name them (a pasted image without hires fix turns it off)
const PASTE_DEFAULTS = {
  clip_skip: 1, subseed: -1, subseed_strength: 0, seed_resize_from_w: 0, seed_resize_from_h: 0, hr_scale: 2,
  hr_second_pass_steps: 0, hr_resize_x: 0, hr_resize_y: 0, hr_sampler_name: "Use same sampler",
  hr_scheduler: "Use same scheduler", hr_prompt: "", hr_negative_prompt: "", refiner_switch_at: 0.8,
};
const CHOICES = { // infotext words -> the value of a <select>
  inpainting_fill: ["fill", "original", "latent noise", "latent nothing"],
  resize_mode: ["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"],
};

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await fetch(API + path, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && data.detail;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail || response.statusText));
  }
  return data;
}

function fillSelect(select, items, value, label) {
  for (const item of items) {
    const option = document.createElement("option");
    option.value = value(item);
    option.textContent = label ? label(item) : value(item);
    select.append(option);
  }
}

async function loadLists() {
  const paths = ["/samplers", "/schedulers", "/sd-models", "/options", "/loras", "/embeddings", "/prompt-styles",
                 "/latent-upscale-modes", "/upscalers", "/hypernetworks", "/sd-vae"];
  const [samplers, schedulers, models, options, loras, embeddings, styles, latentModes, upscalers, hypernets, vaes] =
    await Promise.all(paths.map((p) => api(p)));
  showVaes(vaes, options);
  fillSelect($("sampler_name"), samplers, (s) => s.name);
  $("sampler_name").value = "Euler a";
  fillSelect($("hr_sampler_name"), samplers, (s) => s.name);
  fillSelect($("scheduler"), schedulers, (s) => s.label);
  fillSelect($("hr_scheduler"), schedulers, (s) => s.label);
  fillSelect($("hr_upscaler"), [...latentModes, ...upscalers], (u) => u.name);
  $("hr_upscaler").value = "Latent";
  showModels(models, options);
  fillSelect($("lora"), loras, (l) => l.name, (l) => l.alias || l.name);
  fillSelect($("hypernet"), hypernets, (h) => h.name);
  fillSelect($("embedding"), Object.keys(embeddings.loaded), (name) => name);
  fillSelect($("styles"), styles, (s) => s.name);
  $("clip_skip").value = options.CLIP_stop_at_last_layers || 1;
  await loadControlNetModels();
}

// --- ControlNet: the unit's model half (controlnet.js holds the preprocessor half), sent as
// alwayson_scripts.controlnet.args as the extension takes it

async function loadControlNetModels() {
  const response = await fetch("/controlnet/model_list");
  const {model_list: models} = await response.json();
  fillSelect($("cn_model"), models, (m) => m);
}

function applyControlNetParameters(p) {
  // "ControlNet 0": "Module: canny, Model: name [hash], Weight: 1.0, ..." as the extension writes it; the image stays
  const text = p["ControlNet 0"];
  $("cn_enabled").checked = Boolean(text);
  const ids = {module: "cn_module", model: "cn_model", weight: "cn_weight", guidance_start: "cn_guidance_start",
               guidance_end: "cn_guidance_end", control_mode: "cn_control_mode", hr_option: "cn_hr_option",
               resize_mode: "cn_resize_mode", pixel_perfect: "cn_pixel_perfect"};
  for (const item of text ? text.split(", ") : []) {
    const [key, value] = item.split(": ");
    const id = ids[key.toLowerCase().replace(/ /g, "_")];
    if (!id) continue;
    if ($(id).type === "checkbox") $(id).checked = value === "True"; else $(id).value = value;
  }
}

function controlNetUnits() {
  if (!$("cn_enabled").checked) return [];
  return [{
    ...controlnetPreprocessor.fields(), model: $("cn_model").value, weight: numberOrNull("cn_weight") ?? 1,
    guidance_start: numberOrNull("cn_guidance_start") ?? 0, guidance_end: numberOrNull("cn_guidance_end") ?? 1,
    control_mode: $("cn_control_mode").value, hr_option: $("cn_hr_option").value,
  }];
}

function showModels(models, options) {
  $("model").replaceChildren();
  fillSelect($("model"), models, (m) => m.title);
  $("model").value = options.sd_model_checkpoint || "";
  $("refiner_checkpoint").replaceChildren(new Option("None", ""));
  fillSelect($("refiner_checkpoint"), models, (m) => m.title);
}

function showVaes(vaes, options) {
  // A1111's choices: Automatic, None, then the VAE files by name
  $("sd_vae").replaceChildren(new Option("Automatic"), new Option("None"));
  fillSelect($("sd_vae"), vaes, (v) => v.model_name);
  $("sd_vae").value = options.sd_vae || "Automatic";
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

// --- the request: one A1111 payload from the form

function payload() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    styles: [...$("styles").selectedOptions].map((o) => o.value),
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
    steps: numberOrNull("steps"), cfg_scale: numberOrNull("cfg_scale"), seed: numberOrNull("seed") ?? -1,
    batch_size: numberOrNull("batch_size"), n_iter: numberOrNull("n_iter"),
    subseed: numberOrNull("subseed") ?? -1, subseed_strength: numberOrNull("subseed_strength") ?? 0,
    seed_resize_from_w: numberOrNull("seed_resize_from_w") ?? 0,
    seed_resize_from_h: numberOrNull("seed_resize_from_h") ?? 0,
    tiling: $("tiling").checked,
    override_settings: {CLIP_stop_at_last_layers: numberOrNull("clip_skip") ?? 1},
  };
  for (const side of ["width", "height"]) {
    if (numberOrNull(side) !== null) body[side] = numberOrNull(side);
  }
  if ($("restore_faces").value) { // A1111: the flag, the model and CodeFormer's weight are settings
    body.restore_faces = true;
    body.override_settings.face_restoration_model = $("restore_faces").value;
    body.override_settings.code_former_weight = numberOrNull("code_former_weight") ?? 0.5;
  }
  if ($("refiner_checkpoint").value) {
    body.refiner_checkpoint = $("refiner_checkpoint").value;
    body.refiner_switch_at = numberOrNull("refiner_switch_at");
  }
  const units = controlNetUnits();
  if (units.length) body.alwayson_scripts = {controlnet: {args: units}};
  if (mode() === "img2img") {
    Object.assign(body, img2imgFields());
  } else if ($("enable_hr").checked) {
    Object.assign(body, hiresFields());
  }
  if (typeof scriptPanel !== "undefined") Object.assign(body, scriptPanel.fields()); // static/scripts.js
  return body;
}

function hiresFields() {
  return {
    enable_hr: true, hr_upscaler: $("hr_upscaler").value, hr_scale: numberOrNull("hr_scale"),
    hr_second_pass_steps: numberOrNull("hr_second_pass_steps") ?? 0,
    hr_resize_x: numberOrNull("hr_resize_x") ?? 0, hr_resize_y: numberOrNull("hr_resize_y") ?? 0,
    denoising_strength: numberOrNull("hr_denoising_strength"), hr_sampler_name: $("hr_sampler_name").value,
    hr_scheduler: $("hr_scheduler").value, hr_prompt: $("hr_prompt").value,
    hr_negative_prompt: $("hr_negative_prompt").value,
  };
}

function img2imgFields() {
  if (!initImage) throw new Error("choose an image for img2img");
  const fields = {
    init_images: [initImage], denoising_strength: numberOrNull("denoising_strength"),
    resize_mode: Number($("resize_mode").value),
  };
  if (maskPainted) {
    Object.assign(fields, {
      mask: exportMask(), mask_blur: numberOrNull("mask_blur"),
      inpainting_mask_invert: $("inpainting_mask_invert").checked ? 1 : 0,
      inpainting_fill: Number($("inpainting_fill").value), inpaint_full_res: $("inpaint_full_res").value === "1",
      inpaint_full_res_padding: numberOrNull("inpaint_full_res_padding") ?? 32,
    });
  }
  return fields;
}

// --- generating, with the progress of this page's own job only

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function newTaskId() {
  const random = window.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
  return `task(${random})`;
}

async function pollProgress(stop, taskId) {
  while (!stop.done) {
    try {
      const p = await api("/progress");
      if (stop.done) break; // the answer came in after the job ended
      if (p.current_task === taskId) {
        $("progress").value = p.progress;
        setStatus(`${p.textinfo || ""} (batch ${p.state.job_no + 1}/${p.state.job_count})`);
        if (p.current_image) {
          $("preview").src = "data:image/png;base64," + p.current_image;
          $("preview").hidden = false;
        }
      } else if (p.current_task) { // someone else's job (another tab, another client) holds the device
        setStatus("Waiting: another job is running" + (p.queue_pending ? `, ${p.queue_pending} queued` : ""));
      }
    } catch (e) { /* the next poll will tell */ }
    await new Promise((r) => setTimeout(r, 300));
  }
}

async function generate(event) {
  event.preventDefault();
  let body;
  try {
    body = payload();
  } catch (e) {
    return setStatus(e.message, true);
  }
  body.force_task_id = newTaskId();
  $("generate").disabled = true;
  $("progress").hidden = false;
  $("progress").value = 0;
  setStatus("Waiting...");
  const stop = {done: false};
  pollProgress(stop, body.force_task_id);
  try {
    const result = await api("/" + mode(), body);
    const info = JSON.parse(result.info);
    setStatus(`${info.interrupted ? "Interrupted" : "Done"}: ${result.images.length} image(s)` +
              (info.comments ? ` (${info.comments.trim()})` : ""));
    showResults(result, info);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    stop.done = true;
    $("generate").disabled = false;
    $("progress").hidden = true;
    $("preview").hidden = true;
  }
}

function showResults(result, info) {
  $("results").replaceChildren();
  result.images.forEach((b64, i) => {
    const card = document.createElement("div");
    card.className = "result";
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = `result ${i + 1}`;
    const text = document.createElement("pre");
    text.textContent = info.infotexts[i] || "";
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "reuse";
    reuse.textContent = "Reuse parameters";
    reuse.onclick = () => reuseParameters(b64);
    const link = document.createElement("a");
    link.href = img.src;
    link.download = `sdonnx-${info.all_seeds[i]}.png`;
    link.textContent = "Download";
    card.append(img, text, reuse, " ", link);
    $("results").append(card);
  });
  if (info.ignored_fields && info.ignored_fields.length) {
    const note = document.createElement("p");
    note.className = "hint";
    note.textContent = "Ignored: " + info.ignored_fields.join(", ");
    $("results").append(note);
  }
}

// --- parameters from an image's infotext

async function reuseParameters(b64) {
  const {parameters} = await api("/png-info", {image: b64});
  applyParameters(parameters);
  setStatus("Parameters loaded from the image");
}

function applyParameters(p) {
  for (const [id, key] of Object.entries(PASTE)) {
    const value = p[key] !== undefined ? p[key] : PASTE_DEFAULTS[id];
    if (value !== undefined) $(id).value = value;
  }
  applyControlNetParameters(p);
  const hires = p["Hires upscale"] !== undefined || p["Hires resize"] !== undefined;
  $("enable_hr").checked = hires;
  $("hires_section").open = $("hires_section").open || hires;
  if (p["Denoising strength"] !== undefined) $(hires ? "hr_denoising_strength" : "denoising_strength").value = p["Denoising strength"];
  $("hr_upscaler").value = p["Hires upscaler"] || "Latent";
  $("tiling").checked = p.Tiling === "True";
  $("restore_faces").value = p["Face restoration"] || "";
  $("code_former_weight").value = p["CodeFormer weight"] ?? 0.5;
  $("refiner_checkpoint").value = refinerTitle(p.Refiner);
  for (const [id, words] of Object.entries(CHOICES)) {
    const key = id === "inpainting_fill" ? "Masked content" : "Resize mode";
    $(id).value = String(Math.max(0, words.findIndex((w) => w.toLowerCase() === (p[key] || "").toLowerCase())));
  }
  if (p["Masked content"] === undefined) $("inpainting_fill").value = "1"; // A1111's UI default: original
  $("inpaint_full_res").value = p["Inpaint area"] === "Only masked" ? "1" : "0";
  if (p["Masked area padding"] === undefined) $("inpaint_full_res_padding").value = 32;
}

function refinerTitle(text) {
  // "name [hash]": the hash finds the model whatever its folder is called
  if (!text) return "";
  const hash = (text.match(/\[(\w+)\]$/) || [])[1];
  const option = [...$("refiner_checkpoint").options].find(
    (o) => o.value && (o.value === text || (hash && o.value.endsWith(`[${hash}]`)) || o.value.split(" [")[0] === text));
  return option ? option.value : "";
}

// --- the PNG info tab

async function readPngInfo(file) {
  const dataUrl = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  try {
    const result = await api("/png-info", {image: dataUrl});
    pngInfo = {image: dataUrl, parameters: result.parameters};
    $("png_image").src = dataUrl;
    $("png_image").hidden = false;
    $("png_text").textContent = result.info || "(no parameters in this image)";
    showParameterTable(result.info ? result.parameters : {});
    $("png_to_txt2img").disabled = $("png_to_img2img").disabled = !result.info;
  } catch (e) {
    $("png_text").textContent = e.message;
  }
}

function showParameterTable(parameters) {
  const rows = Object.entries(parameters).filter(([key]) => !/-[12]$/.test(key)).map(([key, value]) => {
    const row = document.createElement("tr");
    const name = document.createElement("th");
    const cell = document.createElement("td");
    name.textContent = key;
    cell.textContent = value;
    row.append(name, cell);
    return row;
  });
  $("png_params").replaceChildren(...rows);
}

function sendTo(target) {
  applyParameters(pngInfo.parameters);
  document.querySelector(`input[name=mode][value=${target}]`).checked = true;
  showMode();
  if (target === "img2img") loadInitImage(pngInfo.image);
  showTab("generate_tab");
  setStatus("Parameters loaded from the PNG info tab");
}

function showTab(id) {
  for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== id;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === id);
}

function showMode() {
  $("img2img").hidden = mode() !== "img2img";
  for (const el of document.querySelectorAll(".txt2img-only")) el.hidden = mode() !== "txt2img";
}

function appendToPrompt(text) {
  const prompt = $("prompt");
  prompt.value = prompt.value.trim() ? `${prompt.value.trim()}, ${text}` : text;
}

// --- img2img: the image with a mask painted over it, shown at a usable size

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => loadInitImage(reader.result);
  reader.readAsDataURL(file);
}

function loadInitImage(dataUrl) {
  initImage = dataUrl;
  const img = new Image();
  img.onload = () => {
    const scale = Math.min(PAINT_BOX[0] / img.naturalWidth, PAINT_BOX[1] / img.naturalHeight);
    for (const canvas of [$("init_canvas"), $("mask_canvas")]) {
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      // small images grow and large ones shrink to the box; painting maps back to image pixels
      canvas.style.width = `${Math.round(img.naturalWidth * scale)}px`;
      canvas.style.height = `${Math.round(img.naturalHeight * scale)}px`;
    }
    $("init_canvas").getContext("2d").drawImage(img, 0, 0);
    clearMask();
  };
  img.src = dataUrl;
}

function clearMask() {
  const canvas = $("mask_canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  maskPainted = false;
}

function paintAt(event) {
  const canvas = $("mask_canvas");
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  ctx.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale,
          Number($("brush").value) * scale / 2, 0, 2 * Math.PI);
  ctx.fill();
  maskPainted = true;
}

function exportMask() {
  // white where painted, black elsewhere, at the image's own size (A1111's mask convention)
  const source = $("mask_canvas");
  const canvas = document.createElement("canvas");
  canvas.width = source.width;
  canvas.height = source.height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(source, 0, 0);
  return canvas.toDataURL("image/png");
}

function wirePngInfo() {
  const drop = $("png_drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) readPngInfo(e.dataTransfer.files[0]);
  });
  $("png_file").onchange = (e) => e.target.files[0] && readPngInfo(e.target.files[0]);
  $("png_to_txt2img").onclick = () => sendTo("txt2img");
  $("png_to_img2img").onclick = () => sendTo("img2img");
}

function wire() {
  $("form").addEventListener("submit", generate);
  $("interrupt").onclick = () => api("/interrupt", {});
  $("skip").onclick = () => api("/skip", {});
  $("random_seed").onclick = () => { $("seed").value = -1; };
  $("add_lora").onclick = () => $("lora").value && appendToPrompt(`<lora:${$("lora").value}:1>`);
  $("add_hypernet").onclick = () => $("hypernet").value && appendToPrompt(`<hypernet:${$("hypernet").value}:1>`);
  $("add_embedding").onclick = () => $("embedding").value && appendToPrompt($("embedding").value);
  $("model").onchange = async () => {
    try {
      await api("/options", {sd_model_checkpoint: $("model").value});
      setStatus(`Model: ${$("model").value}`);
    } catch (e) {
      setStatus(e.message, true);
    }
  };
  $("sd_vae").onchange = async () => {
    try {
      await api("/options", {sd_vae: $("sd_vae").value});
      setStatus(`VAE: ${$("sd_vae").value}`);
    } catch (e) {
      setStatus(e.message, true);
    }
  };
  $("refresh").onclick = async () => {
    await api("/refresh-checkpoints", {});
    const [models, options, vaes] = await Promise.all([api("/sd-models"), api("/options"), api("/sd-vae")]);
    showModels(models, options);
    showVaes(vaes, options);
  };
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.onchange = showMode;
  for (const tab of document.querySelectorAll(".tab")) tab.onclick = () => showTab(tab.dataset.tab);
  $("init_image").onchange = (e) => e.target.files[0] && readFile(e.target.files[0]);
  $("clear_mask").onclick = clearMask;
  const mask = $("mask_canvas");
  let painting = false;
  mask.addEventListener("pointerdown", (e) => { painting = true; mask.setPointerCapture(e.pointerId); paintAt(e); });
  mask.addEventListener("pointermove", (e) => painting && paintAt(e));
  mask.addEventListener("pointerup", () => { painting = false; });
  wirePngInfo();
}

wire();
loadLists().then(() => document.body.setAttribute("data-ready", "1"),
                 (e) => setStatus("Cannot reach the API: " + e.message, true));
