// covidscan web page: upload one image, show probabilities as bars and the Grad-CAM overlay.
"use strict";

const $ = (id) => document.getElementById(id);
const BROWSER_IMAGES = ["image/png", "image/jpeg"];

async function postImage(path, file) {
  const form = new FormData();
  form.append("file", file, file.name);
  const response = await fetch(path, { method: "POST", body: form });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.detail || body.error || `HTTP ${response.status}`);
  }
  return response;
}

function showUrl(img, blob) {
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  img.dataset.url = URL.createObjectURL(blob);
  img.src = img.dataset.url;
}

function renderBars(result) {
  const bars = $("bars");
  bars.replaceChildren();
  const entries = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [name, p] of entries) {
    const row = document.createElement("div");
    row.className = "bar" + (name === result.predicted_label ? " top" : "");
    row.dataset.class = name;
    const label = document.createElement("span");
    label.textContent = name;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.textContent = `${(100 * p).toFixed(1)} %`;
    row.append(label, track, value);
    bars.append(row);
  }
  $("label").textContent = result.predicted_label;
  $("meta").textContent = `model ${result.model_id} · version ${result.model_version} · ` +
    `${result.engine} · ${result.timing_ms.total} ms`;
}

async function analyse(file) {
  $("status").className = "muted";
  $("status").textContent = `Analysing ${file.name}…`;
  $("result").hidden = true;
  try {
    const isBrowserImage = BROWSER_IMAGES.includes(file.type);
    const [prediction, preview] = await Promise.all([
      postImage("/v1/predict", file).then((r) => r.json()),
      isBrowserImage ? Promise.resolve(file) : postImage("/v1/preview", file).then((r) => r.blob()),
    ]);
    showUrl($("image"), preview);
    renderBars(prediction);
    $("result").hidden = false;
    $("status").textContent = "";
    await loadHeatmap(file);
  } catch (error) {
    $("status").className = "error";
    $("status").textContent = `Could not analyse ${file.name}: ${error.message}`;
  }
}

async function loadHeatmap(file) {
  $("heatmap-caption").textContent = "Grad-CAM overlay (computing…)";
  try {
    showUrl($("heatmap"), await (await postImage("/v1/explain", file)).blob());
    $("heatmap-caption").textContent = "Grad-CAM overlay: regions that raised the predicted class";
  } catch (error) {
    $("heatmap-caption").textContent = `Heatmap unavailable: ${error.message}`;
  }
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => event.target.files[0] && analyse(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) analyse(event.dataTransfer.files[0]);
  });
  fetch("/v1/model").then((r) => r.json()).then((model) => {
    $("model-line").textContent = `${model.architecture} · classes: ${model.class_names.join(", ")} · ` +
      `input ${model.input_size} px · version ${model.version}`;
  }).catch(() => { $("model-line").textContent = "model information unavailable"; });
}

setUp();
