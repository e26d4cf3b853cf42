// Script section: A1111's X/Y/Z plot, prompt matrix and prompts from file, sent as script_name/script_args.
// Axis types come from /sdapi/v1/script-info (txt2img and img2img have their own lists) and are sent by name,
// with their values as text (csv_mode), which the server reads as A1111 does. Loaded after app.js.
"use strict";

const scriptPanel = (() => {
  const el = (id) => document.getElementById(id);
  const SECTIONS = {"x/y/z plot": "script_xyz", "prompt matrix": "script_matrix",
                    "prompts from file or textbox": "script_file"};
  const LABELS = {"x/y/z plot": "X/Y/Z plot", "prompt matrix": "Prompt matrix",
                  "prompts from file or textbox": "Prompts from file or textbox"};
  let info = [];

  const currentMode = () => document.querySelector("input[name=mode]:checked").value;

  async function load() {
    const response = await fetch("/sdapi/v1/script-info");
    info = await response.json();
    const names = [...new Set(info.map((s) => s.name))];
    el("script_name").append(...names.map((name) => new Option(LABELS[name] || name, name)));
    el("script_name").addEventListener("change", show);
    for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", fillAxes);
    fillAxes();
    show();
  }

  // the axis type dropdowns of the current mode; a type chosen before is kept where the new list has it
  function fillAxes() {
    const img2img = currentMode() === "img2img";
    const xyz = info.find((s) => s.name === "x/y/z plot" && s.is_img2img === img2img);
    if (!xyz) return;
    for (const [i, axis] of ["x", "y", "z"].entries()) {
      const select = el(`xyz_${axis}_type`), before = select.value || xyz.args[i * 3].value;
      select.replaceChildren(...xyz.args[i * 3].choices.map((label) => new Option(label, label)));
      select.value = xyz.args[i * 3].choices.includes(before) ? before : "Nothing";
    }
  }

  function show() {
    for (const [name, id] of Object.entries(SECTIONS)) el(id).hidden = el("script_name").value !== name;
  }

  const number = (id) => Number(el(id).value || 0);

  function args(name) {
    if (name === "x/y/z plot") {
      const axes = ["x", "y", "z"].flatMap((a) => [el(`xyz_${a}_type`).value, el(`xyz_${a}_values`).value, []]);
      return [...axes, el("xyz_draw_legend").checked, el("xyz_include_lone_images").checked,
              el("xyz_include_sub_grids").checked, el("xyz_no_fixed_seeds").checked, false, false, false,
              number("xyz_margin_size"), true];
    }
    if (name === "prompt matrix") {
      return [el("matrix_put_at_start").checked, el("matrix_different_seeds").checked, el("matrix_prompt_type").value,
              el("matrix_delimiter").value, number("matrix_margin_size")];
    }
    return [el("file_iterate").checked, el("file_same_seed").checked, el("file_position").value,
            el("file_prompts").value];
  }

  // {script_name, script_args} for the request, or nothing when no script is chosen
  function fields() {
    const name = el("script_name").value;
    return name ? {script_name: name, script_args: args(name)} : {};
  }

  return {load, fields};
})();

scriptPanel.load().catch((e) => setStatus(`scripts: ${e.message}`, true));
