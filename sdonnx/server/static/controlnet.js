// ControlNet unit, preprocessor half: the control image, the preprocessor with its sliders as the extension's
// /controlnet/module_list describes them, resize mode, Pixel Perfect, and a preview through /controlnet/detect.
// controlnetPreprocessor.fields() gives these as the extension's unit fields. Loaded after app.js (setStatus).
"use strict";

const controlnetPreprocessor = (() => {
  const el = (id) => document.getElementById(id);
  const state = {image: null, size: null, detail: {}}; // image: data URL; size: [width, height]
  const SLIDERS = ["cn_processor_res", "cn_threshold_a", "cn_threshold_b"];

  async function getJson(path, body) {
    const init = body === undefined ? {} : {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    };
    const response = await fetch(path, init);
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      const detail = data && data.detail;
      throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail || response.statusText));
    }
    return data;
  }

  async function load() {
    const [plain, labelled] = await Promise.all([
      getJson("/controlnet/module_list"), getJson("/controlnet/module_list?alias_names=true")]);
    state.detail = plain.module_detail;
    const select = el("cn_module");
    select.replaceChildren(...plain.module_list.map((name, i) => new Option(labelled.module_list[i], name)));
    showSliders(true);
  }

  // the extension lists only visible sliders: "Resolution" first when shown, then threshold A and B
  function slidersOf(module) {
    const sliders = [...(state.detail[module]?.sliders || [])];
    const resolution = sliders[0]?.name === "Resolution" ? sliders.shift() : null;
    return [resolution, sliders[0] || null, sliders[1] || null];
  }

  // a new module brings its own sliders and defaults; Pixel Perfect only hides the resolution
  function showSliders(reset) {
    const sliders = slidersOf(el("cn_module").value);
    SLIDERS.forEach((id, i) => {
      const input = el(id), slider = sliders[i];
      input.closest("label").hidden = !slider || (i === 0 && el("cn_pixel_perfect").checked);
      if (!slider || !reset) return;
      input.closest("label").querySelector("span").textContent = slider.name;
      Object.assign(input, {min: slider.min, max: slider.max, step: slider.step, value: slider.value});
    });
  }

  function setImage(dataUrl) {
    const img = new Image();
    img.onload = () => {
      state.image = dataUrl;
      state.size = [img.naturalWidth, img.naturalHeight];
      el("cn_input").src = dataUrl;
      el("cn_input").hidden = false;
      el("cn_preview").hidden = true;
    };
    img.src = dataUrl;
  }

  // the extension's pixel_perfect_resolution: the short side the image takes at the generation size
  function pixelPerfect() {
    const [w, h] = state.size;
    const width = Number(el("width").value) || 512, height = Number(el("height").value) || 512;
    const k = el("cn_resize_mode").value === "Resize and Fill"
      ? Math.min(height / h, width / w) : Math.max(height / h, width / w);
    return Math.round(k * Math.min(w, h));
  }

  // hidden sliders send -1, the extension's "the module's default" (with Pixel Perfect the resolution is computed)
  function fields() {
    const [res, a, b] = SLIDERS.map((id) => (el(id).closest("label").hidden ? -1 : Number(el(id).value)));
    return {
      enabled: true, image: state.image, module: el("cn_module").value, processor_res: res, threshold_a: a,
      threshold_b: b, pixel_perfect: el("cn_pixel_perfect").checked, resize_mode: el("cn_resize_mode").value,
    };
  }

  function blankMask() { // inpaint modules need a mask; the preview shows the image with nothing masked
    const canvas = document.createElement("canvas");
    [canvas.width, canvas.height] = state.size;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/png");
  }

  async function preview() {
    if (!state.image) return setStatus("choose a control image first", true);
    const unit = fields();
    const body = {
      controlnet_module: unit.module, controlnet_input_images: [state.image],
      controlnet_processor_res: unit.pixel_perfect ? pixelPerfect() : unit.processor_res,
      controlnet_threshold_a: unit.threshold_a, controlnet_threshold_b: unit.threshold_b,
    };
    if (unit.module.startsWith("inpaint")) body.controlnet_masks = [blankMask()];
    try {
      const result = await getJson("/controlnet/detect", body);
      el("cn_preview").src = "data:image/png;base64," + result.images[0];
      el("cn_preview").hidden = false;
    } catch (e) {
      setStatus(`ControlNet preview: ${e.message}`, true);
    }
  }

  function wire() {
    el("cn_module").onchange = () => showSliders(true);
    el("cn_pixel_perfect").onchange = () => showSliders(false);
    el("cn_preview_button").onclick = preview;
    el("cn_image").onchange = (e) => {
      const file = e.target.files[0];
      if (!file) return;
      const reader = new FileReader();
      reader.onload = () => setImage(reader.result);
      reader.readAsDataURL(file);
    };
  }

  wire();
  const ready = load().catch((e) => setStatus(`ControlNet preprocessors unavailable: ${e.message}`, true));
  return {fields, setImage, preview, pixelPerfect, ready};
})();
