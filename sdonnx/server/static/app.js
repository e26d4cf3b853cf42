// sdonnx web page: plain JS over the server's A1111 API (/sdapi/v1); no build step.
"use strict";

const API = "/sdapi/v1";
const $ = (id) => document.getElementById(id);
let initImage = null; // data URL of the uploaded image
let maskPainted = false;

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
  const [samplers, schedulers, models, options, loras, embeddings] = await Promise.all(
    ["/samplers", "/schedulers", "/sd-models", "/options", "/loras", "/embeddings"].map((p) => api(p)));
  fillSelect($("sampler_name"), samplers, (s) => s.name);
  $("sampler_name").value = "Euler a";
  fillSelect($("scheduler"), schedulers, (s) => s.label);
  $("model").replaceChildren();
  fillSelect($("model"), models, (m) => m.title);
  $("model").value = options.sd_model_checkpoint || "";
  fillSelect($("lora"), loras, (l) => l.name, (l) => l.alias || l.name);
  fillSelect($("embedding"), Object.keys(embeddings.loaded), (name) => name);
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function payload() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
    steps: numberOrNull("steps"), cfg_scale: numberOrNull("cfg_scale"), seed: numberOrNull("seed") ?? -1,
    batch_size: numberOrNull("batch_size"), n_iter: numberOrNull("n_iter"),
  };
  for (const side of ["width", "height"]) {
    if (numberOrNull(side) !== null) body[side] = numberOrNull(side);
  }
  if (mode() === "img2img") {
    if (!initImage) throw new Error("choose an image for img2img");
    body.init_images = [initImage];
    body.denoising_strength = numberOrNull("denoising_strength");
    if (maskPainted) {
      body.mask = exportMask();
      body.mask_blur = numberOrNull("mask_blur");
      body.inpainting_mask_invert = $("inpainting_mask_invert").checked ? 1 : 0;
    }
  }
  return body;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function pollProgress(stop) {
  while (!stop.done) {
    try {
      const p = await api("/progress");
      if (p.current_task) {
        $("progress").value = p.progress;
        setStatus(`${p.textinfo || ""} (batch ${p.state.job_no + 1}/${p.state.job_count})` +
                  (p.queue_pending ? `, ${p.queue_pending} queued` : ""));
        if (p.current_image) {
          $("preview").src = "data:image/png;base64," + p.current_image;
          $("preview").hidden = false;
        }
      }
    } catch (e) { /* the next poll will tell */ }
    await new Promise((r) => setTimeout(r, 400));
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
  $("generate").disabled = true;
  $("progress").hidden = false;
  $("progress").value = 0;
  setStatus("Waiting...");
  const stop = {done: false};
  pollProgress(stop);
  try {
    const result = await api("/" + mode(), body);
    const info = JSON.parse(result.info);
    setStatus(`${info.interrupted ? "Interrupted" : "Done"}: ${result.images.length} image(s)`);
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

async function reuseParameters(b64) {
  const {parameters: p} = await api("/png-info", {image: b64});
  const fields = {prompt: "Prompt", negative_prompt: "Negative prompt", steps: "Steps", cfg_scale: "CFG scale",
                  seed: "Seed", width: "Size-1", height: "Size-2", sampler_name: "Sampler", scheduler: "Schedule type"};
  for (const [id, key] of Object.entries(fields)) {
    if (p[key] !== undefined) $(id).value = p[key];
  }
  setStatus("Parameters loaded from the image");
}

function appendToPrompt(text) {
  const prompt = $("prompt");
  prompt.value = prompt.value.trim() ? `${prompt.value.trim()}, ${text}` : text;
}

// --- img2img: the uploaded image with a mask painted over it

function loadInitImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    initImage = reader.result;
    const img = new Image();
    img.onload = () => {
      for (const canvas of [$("init_canvas"), $("mask_canvas")]) {
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
      }
      $("init_canvas").getContext("2d").drawImage(img, 0, 0);
      clearMask();
    };
    img.src = initImage;
  };
  reader.readAsDataURL(file);
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

function wire() {
  $("form").addEventListener("submit", generate);
  $("interrupt").onclick = () => api("/interrupt", {});
  $("skip").onclick = () => api("/skip", {});
  $("random_seed").onclick = () => { $("seed").value = -1; };
  $("add_lora").onclick = () => $("lora").value && appendToPrompt(`<lora:${$("lora").value}:1>`);
  $("add_embedding").onclick = () => $("embedding").value && appendToPrompt($("embedding").value);
  $("model").onchange = async () => {
    try {
      await api("/options", {sd_model_checkpoint: $("model").value});
      setStatus(`Model: ${$("model").value}`);
    } catch (e) {
      setStatus(e.message, true);
    }
  };
  $("refresh").onclick = async () => {
    await api("/refresh-checkpoints", {});
    const [models, options] = await Promise.all([api("/sd-models"), api("/options")]);
    $("model").replaceChildren();
    fillSelect($("model"), models, (m) => m.title);
    $("model").value = options.sd_model_checkpoint || "";
  };
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.onchange = () => { $("img2img").hidden = mode() !== "img2img"; };
  }
  $("init_image").onchange = (e) => e.target.files[0] && loadInitImage(e.target.files[0]);
  $("clear_mask").onclick = clearMask;
  const mask = $("mask_canvas");
  let painting = false;
  mask.addEventListener("pointerdown", (e) => { painting = true; mask.setPointerCapture(e.pointerId); paintAt(e); });
  mask.addEventListener("pointermove", (e) => painting && paintAt(e));
  mask.addEventListener("pointerup", () => { painting = false; });
}

wire();
loadLists().then(() => document.body.setAttribute("data-ready", "1"),
                 (e) => setStatus("Cannot reach the API: " + e.message, true));
