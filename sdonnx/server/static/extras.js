// Extras tab: A1111's postprocessing on one image through /sdapi/v1/extra-single-image, with the API's own
// field names (upscaler_1, upscaling_resize, ...). The upscaler lists come from /sdapi/v1/upscalers.
// Face restoration: GFPGAN and CodeFormer visibilities and CodeFormer's weight. Loaded after app.js.
"use strict";

const extrasPanel = (() => {
  const el = (id) => document.getElementById(id);
  let image = null; // the chosen image as a data URL

  async function load() {
    const response = await fetch("/sdapi/v1/upscalers");
    const upscalers = await response.json();
    for (const id of ["extras_upscaler_1", "extras_upscaler_2"]) {
      el(id).replaceChildren(...upscalers.map((u) => new Option(u.name, u.name)));
    }
    el("extras_image").addEventListener("change", choose);
    el("extras_resize_mode").addEventListener("change", showMode);
    el("extras_run").addEventListener("click", run);
    showMode();
  }

  function showMode() {
    const scaleTo = el("extras_resize_mode").value === "1";
    el("extras_upscaling_resize").closest("label").hidden = scaleTo;
    for (const id of ["extras_upscaling_resize_w", "extras_upscaling_resize_h", "extras_upscaling_crop"]) {
      el(id).closest("label").hidden = !scaleTo;
    }
  }

  function choose() {
    const file = el("extras_image").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => { image = reader.result; };
    reader.readAsDataURL(file);
  }

  function fields() {
    return {
      resize_mode: Number(el("extras_resize_mode").value),
      upscaling_resize: Number(el("extras_upscaling_resize").value),
      upscaling_resize_w: Number(el("extras_upscaling_resize_w").value),
      upscaling_resize_h: Number(el("extras_upscaling_resize_h").value),
      upscaling_crop: el("extras_upscaling_crop").checked,
      upscaler_1: el("extras_upscaler_1").value,
      upscaler_2: el("extras_upscaler_2").value,
      extras_upscaler_2_visibility: Number(el("extras_upscaler_2_visibility").value),
      gfpgan_visibility: Number(el("extras_gfpgan_visibility").value),
      codeformer_visibility: Number(el("extras_codeformer_visibility").value),
      codeformer_weight: Number(el("extras_codeformer_weight").value),
    };
  }

  async function run() {
    if (!image) {
      el("extras_status").textContent = "Choose an image first";
      return;
    }
    el("extras_status").textContent = "Working...";
    el("extras_run").disabled = true;
    try {
      const response = await fetch("/sdapi/v1/extra-single-image", {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({image, ...fields()}),
      });
      const data = await response.json();
      if (!response.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
      el("extras_result").src = "data:image/png;base64," + data.image;
      el("extras_result").hidden = false;
      el("extras_info").textContent = new DOMParser().parseFromString(data.html_info, "text/html").body.textContent;
      el("extras_status").textContent = "";
    } catch (error) {
      el("extras_status").textContent = "Error: " + error.message;
    } finally {
      el("extras_run").disabled = false;
    }
  }

  return {load, fields};
})();

extrasPanel.load();
