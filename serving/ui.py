"""The small web page the app serves at ``/``: plain HTML + JS, no build step.

Pick a model (from ``GET /v1/models``), a label or a prompt, guidance, scale, sampler (``SAMPLERS``:
those of ``schema.GenerateV1.sampler``) and steps; ``POST /v1/generate`` and show the grid: greyscale or
colour PNGs, as the model makes them (the model list says ``L`` or ``RGB`` and the size; ``#grid`` gets
``data-mode``). For a text-conditioned model the label input is hidden, the prompt box shows one of the
captions the model was trained on (``info.example_prompts``, ``serving/pool.py``) as its placeholder and
offers the others as suggestions, an empty box generates that placeholder, and guidance starts at the
model's own CFG weight. ``?autorun=1&label=3&n=8``
fills the form from the query string and generates at once (the headless-browser test uses it). When
every image has loaded, ``#status`` gets ``data-loaded="<count>"``.
"""
from typing import get_args

from condgen.serving.schema import GenerateV1

SAMPLERS = get_args(GenerateV1.model_fields["sampler"].annotation)  # ddim (the default) first

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>condgen</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; max-width: 900px; }
  h1 { font-size: 20px; margin: 0 0 12px; }
  form { display: grid; grid-template-columns: repeat(4, auto); gap: 8px 12px; align-items: center; }
  label { font-weight: 600; }
  input, select { padding: 3px 4px; }
  button { grid-column: span 4; padding: 6px; font-weight: 600; }
  #grid { display: grid; grid-template-columns: repeat(8, 84px); gap: 6px; margin-top: 16px; }
  #grid img { width: 84px; height: 84px; image-rendering: pixelated; border: 1px solid #ccc; background: #000; }
  #status { margin-top: 12px; min-height: 1.5em; }
  .error { color: #b00020; }
  pre { background: #f4f4f4; padding: 8px; font-size: 12px; overflow-x: auto; }
</style>
</head>
<body>
<h1>condgen &mdash; conditional generation</h1>
<form id="form" onsubmit="return false">
  <label for="model">model</label><select id="model"></select>
  <label for="adapter">adapter</label><select id="adapter"><option value="">(none)</option></select>
  <label for="label" id="label-name">label</label><input id="label" type="number" min="0" value="3">
  <label for="prompt" id="prompt-name">or prompt</label>
  <input id="prompt" type="text" maxlength="200" list="examples" placeholder="a handwritten digit 3">
  <datalist id="examples"></datalist>
  <label for="guidance">guidance</label>
  <select id="guidance"><option>none</option><option>cfg</option><option>classifier</option><option>clip</option></select>
  <label for="scale">scale</label><input id="scale" type="number" min="0" max="50" step="0.5" value="0">
  <label for="sampler">sampler</label><select id="sampler">@SAMPLERS@</select>
  <label for="steps">steps</label><input id="steps" type="number" min="1" max="1000" placeholder="model default">
  <label for="n">images</label><input id="n" type="number" min="1" max="64" value="8">
  <label for="seed">seed</label><input id="seed" type="number" min="0" value="0">
  <label for="apikey">API key</label><input id="apikey" type="password" placeholder="if the server needs one">
  <span></span><span></span>
  <button id="go" type="button">Generate</button>
</form>
<div id="status"></div>
<div id="grid"></div>
<pre id="params"></pre>
<script>
const $ = (id) => document.getElementById(id);
let MODELS = [];
function setStatus(text, cls) { const s = $("status"); s.textContent = text; s.className = cls || ""; }
function headers() {
  const h = {"content-type": "application/json"};
  const key = $("apikey").value || localStorage.getItem("condgen-api-key") || "";
  if (key) { h["x-api-key"] = key; localStorage.setItem("condgen-api-key", key); }
  return h;
}
function onModel() {
  const m = MODELS.find((x) => x.name === $("model").value);
  const ad = $("adapter"); ad.innerHTML = '<option value="">(none)</option>';
  if (!m) return;
  for (const a of m.adapters) { const o = document.createElement("option"); o.value = o.textContent = a; ad.appendChild(o); }
  const diffusion = m.info.kind === "diffusion";
  for (const id of ["guidance", "scale", "sampler", "steps"]) $(id).disabled = !diffusion;
  if (!diffusion) $("guidance").value = "none";
  $("label").max = m.info.num_classes - 1;
  // a text model takes prompts: its own captions as the placeholder and suggestions, no label input
  const text = m.info.condition === "text", examples = m.info.example_prompts || [];
  $("label").hidden = $("label-name").hidden = text;
  $("prompt-name").textContent = text ? "prompt" : "or prompt";
  const names = m.info.class_names || [];
  $("prompt").placeholder = text ? (examples[0] || "describe the image") :
                            (names.length ? "a " + names[names.length > 3 ? 3 : 0] : "a handwritten digit 3");
  $("examples").innerHTML = "";
  for (const e of text ? examples : []) { const o = document.createElement("option"); o.value = e; $("examples").appendChild(o); }
  if (text && diffusion && m.info.default_guidance_scale > 0) {
    $("guidance").value = "cfg"; $("scale").value = String(m.info.default_guidance_scale);
  }
  $("form").dataset.condition = m.info.condition;
}
async function loadModels() {
  const r = await fetch("v1/models", {headers: headers()});
  if (!r.ok) { setStatus("cannot list models: " + r.status + " " + (await r.text()), "error"); return false; }
  MODELS = (await r.json()).models;
  const sel = $("model"); sel.innerHTML = "";
  for (const m of MODELS) {
    const o = document.createElement("option"); o.value = m.name;
    o.textContent = m.name + " v" + m.version + " (" + m.info.kind + ", " + (m.channels === 3 ? "RGB" : "L") + " " +
                    m.image_size + "\u00d7" + m.image_size + ")";
    sel.appendChild(o);
  }
  onModel();
  return true;
}
async function generate() {
  const body = {model: $("model").value || null, guidance: $("guidance").value,
                scale: parseFloat($("scale").value || "0"), n: parseInt($("n").value || "1"),
                seed: parseInt($("seed").value || "0")};
  const m = MODELS.find((x) => x.name === body.model);
  if (m && m.info.kind === "diffusion") {
    body.sampler = $("sampler").value;
    if ($("steps").value) body.steps = parseInt($("steps").value);
  }
  if ($("adapter").value) body.adapter = $("adapter").value;
  const prompt = $("prompt").value.trim() || (m && m.info.condition === "text" ? $("prompt").placeholder : "");
  if (prompt) body.prompt = prompt; else body.label = parseInt($("label").value || "0");
  setStatus("generating...");
  $("grid").innerHTML = "";
  $("grid").dataset.mode = m && m.channels === 3 ? "RGB" : "L";
  const t0 = performance.now();
  let r;
  try { r = await fetch("v1/generate", {method: "POST", headers: headers(), body: JSON.stringify(body)}); }
  catch (e) { setStatus("request failed: " + e, "error"); return; }
  const data = await r.json().catch(() => ({}));
  if (!r.ok) { setStatus("error " + r.status + ": " + JSON.stringify(data.detail || data), "error"); return; }
  let loaded = 0;
  const total = data.images.length;
  const done = () => {
    loaded += 1;
    if (loaded === total) {
      const ms = Math.round(performance.now() - t0);
      setStatus(total + " images from " + data.model + " v" + data.version + " in " + ms + " ms" +
                (data.safety.blocked ? " (" + data.safety.blocked + " withheld by the safety filter)" : ""));
      $("status").dataset.loaded = String(total);
    }
  };
  for (const b64 of data.images) {
    const img = new Image();
    img.onload = () => { if (img.naturalWidth > 0) done(); };
    img.onerror = () => setStatus("an image failed to load", "error");
    img.alt = "sample"; img.src = "data:image/png;base64," + b64;
    $("grid").appendChild(img);
  }
  if (total === 0) { setStatus("no images (all withheld by the safety filter)"); $("status").dataset.loaded = "0"; }
  $("params").textContent = JSON.stringify({parameters: data.parameters, batch: data.batch}, null, 1);
}
$("go").addEventListener("click", generate);
$("model").addEventListener("change", onModel);
(async () => {
  const q = new URLSearchParams(location.search);
  if (q.get("key")) $("apikey").value = q.get("key");
  if (!(await loadModels())) return;
  for (const id of ["model", "label", "prompt", "guidance", "scale", "sampler", "steps", "n", "seed"]) {
    if (q.has(id)) { $(id).value = q.get(id); if (id === "model") onModel(); }
  }
  if (q.get("autorun")) generate();
})();
</script>
</body>
</html>
""".replace("@SAMPLERS@", "".join(f"<option>{name}</option>" for name in SAMPLERS))
