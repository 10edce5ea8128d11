// covidscan web page: one image (probability bars + Grad-CAM overlay), or a whole CT study (verdict, slice
// viewer with CT windows, per-slice probability strip, Grad-CAM toggle). Plain JS, no build step.
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

function renderBars(result, bars = $("bars")) {
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
}

function renderPrediction(result) {
  renderBars(result);
  $("label").textContent = result.predicted_label;
  $("meta").textContent = `model ${result.model_id} · version ${result.model_version} · ` +
    `${result.engine} · ${result.timing_ms.total} ms`;
}

async function analyse(file) {
  $("status").className = "muted";
  $("status").textContent = `Analysing ${file.name}…`;
  $("result").hidden = true;
  $("study").hidden = true;
  try {
    const isBrowserImage = BROWSER_IMAGES.includes(file.type);
    const [prediction, preview] = await Promise.all([
      postImage("/v1/predict", file).then((r) => r.json()),
      isBrowserImage ? Promise.resolve(file) : postImage("/v1/preview", file).then((r) => r.blob()),
    ]);
    showUrl($("image"), preview);
    renderPrediction(prediction);
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

// -- whole studies ------------------------------------------------------------------------------

const STUDY_SUFFIXES = [".zip", ".nii", ".nii.gz"];
const isStudyFile = (file) => STUDY_SUFFIXES.some((suffix) => file.name.toLowerCase().endsWith(suffix));
const viewer = { study: null, count: 0, index: 0, window: "lung", cam: false, strip: [] };

// CRC-32 (IEEE) for the zip writer below
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(bytes) {
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) crc = CRC_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

// Where a file lies in the folder the user chose or dropped: kept as its name in the zip, so the server
// sees the export as it is (a DICOMDIR or a README is recognised and left out by its name).
const relativePath = (file) => file.relativePath || file.webkitRelativePath || file.name;

// A folder of DICOM files becomes one uncompressed ("stored") zip, the format /v1/studies takes.
async function zipFiles(files) {
  const parts = [], central = [], used = new Set();
  let offset = 0;
  for (const [index, file] of files.entries()) {
    const data = new Uint8Array(await file.arrayBuffer());
    let path = relativePath(file).replace(/^\/+/, "");
    if (used.has(path)) path = `${index}/${path}`;  // the same name from two dropped folders
    used.add(path);
    const name = new TextEncoder().encode(path);
    const crc = crc32(data);
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true); local.setUint16(4, 20, true); local.setUint16(6, 0x0800, true);  // UTF-8 names
    local.setUint32(14, crc, true); local.setUint32(18, data.length, true); local.setUint32(22, data.length, true);
    local.setUint16(26, name.length, true);
    parts.push(local.buffer, name, data);
    const entry = new DataView(new ArrayBuffer(46));
    entry.setUint32(0, 0x02014b50, true); entry.setUint16(4, 20, true); entry.setUint16(6, 20, true); entry.setUint16(8, 0x0800, true);
    entry.setUint32(16, crc, true); entry.setUint32(20, data.length, true); entry.setUint32(24, data.length, true);
    entry.setUint16(28, name.length, true); entry.setUint32(42, offset, true);
    central.push(entry.buffer, name);
    offset += 30 + name.length + data.length;
  }
  const size = central.reduce((sum, part) => sum + part.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true); end.setUint16(8, files.length, true); end.setUint16(10, files.length, true);
  end.setUint32(12, size, true); end.setUint32(16, offset, true);
  return new File([...parts, ...central, end.buffer], "study.zip", { type: "application/zip" });
}

async function analyseStudy(file, label) {
  $("status").className = "muted";
  $("status").textContent = `Analysing study ${label}… (uploading, then predicting every slice)`;
  $("result").hidden = true;
  $("study").hidden = true;
  try {
    const study = await (await postImage("/v1/studies?keep=true", file)).json();
    showStudy(study);
    $("status").textContent = "";
  } catch (error) {
    $("status").className = "error";
    $("status").textContent = `Could not analyse ${label}: ${error.message}`;
  }
}

function studyRule(study) {
  const used = study.items.filter((item) => item.probabilities !== null).length;
  let rule = `${study.aggregation} of ${used} ${study.unit} probabilities`;
  if (study.every > 1) rule += ` (every ${study.every}th slice)`;
  return rule;
}

function showStudy(study) {
  const count = study.series.slices;
  Object.assign(viewer, { study, count, index: 0, strip: [] });
  const predicted = study.predicted_label;
  const column = study.class_names.indexOf(predicted);
  $("study-label").textContent = `${predicted} (${(100 * study.probabilities[predicted]).toFixed(1)} %)`;
  const notice = study.warnings.filter((w) => w.startsWith("Research use"));
  const notes = study.warnings.filter((w) => !w.startsWith("Research use"));
  $("study-notice").textContent = notice.join(" ");
  renderBars(study, $("study-bars"));
  const selection = study.series.selection ? ` Series: ${study.series.selection}.` : "";
  $("study-rule").textContent = `Rule: ${studyRule(study)}.${selection}` + (notes.length ? ` ${notes.join(" ")}` : "");
  $("study-meta").textContent = `model ${study.model.model_id} · version ${study.model.model_version} · ` +
    `${study.model.engine} · ${count} slices · ${study.n_items} ${study.unit}s predicted`;
  // per-slice probability of the predicted class, from the item (slice or stack) covering each slice
  const perSlice = new Array(count).fill(null);
  for (const item of study.items) {
    if (item.probabilities === null) continue;
    for (let k = item.index; k <= item.last_index && k < count; k++) {
      perSlice[k] = Math.max(perSlice[k] ?? 0, item.probabilities[column]);
    }
  }
  const strip = $("strip");
  strip.replaceChildren();
  perSlice.forEach((p, k) => {
    const cell = document.createElement("div");
    cell.className = "cell";
    cell.dataset.index = k;
    cell.title = p === null ? `slice ${k + 1}: not predicted` : `slice ${k + 1}: ${predicted} ${(100 * p).toFixed(1)} %`;
    cell.style.background = p === null ? "#d0d7de" : `hsl(${(1 - p) * 120}, 75%, 45%)`;
    strip.append(cell);
    viewer.strip.push(cell);
  });
  $("study").hidden = false;
  const best = perSlice.reduce((top, p, k) => (p !== null && p > (perSlice[top] ?? -1) ? k : top), 0);
  showSlice(best);
}

function showSlice(index) {
  const study = viewer.study;
  if (!study) return;
  viewer.index = Math.max(0, Math.min(viewer.count - 1, index));
  const k = viewer.index;
  $("slice").src = `/v1/studies/${study.study_id}/slices/${k}?window=${viewer.window}`;
  $("slice-label").textContent = `slice ${k + 1} / ${viewer.count}`;
  viewer.strip.forEach((cell, i) => cell.classList.toggle("current", i === k));
  loadCam();
}

function loadCam() {
  const cam = $("cam");
  if (!viewer.cam) { cam.hidden = true; $("cam-status").textContent = ""; return; }
  const k = viewer.index;
  $("cam-status").textContent = `Grad-CAM of slice ${k + 1} (computing…)`;
  fetch(`/v1/studies/${viewer.study.study_id}/slices/${k}/cam`).then(async (response) => {
    if (!response.ok) throw new Error((await response.json().catch(() => ({}))).detail || `HTTP ${response.status}`);
    if (k !== viewer.index) return;  // the user scrolled on meanwhile
    showUrl(cam, await response.blob());
    cam.hidden = false;
    $("cam-status").textContent = `Grad-CAM of slice ${k + 1}: regions that raised ${response.headers.get("X-Predicted-Label")}`;
  }).catch((error) => { $("cam-status").textContent = `Heatmap unavailable: ${error.message}`; });
}

async function filesFromDrop(items) {
  const files = [];
  async function walk(entry) {
    if (entry.isFile) {
      const file = await new Promise((ok, fail) => entry.file(ok, fail));
      file.relativePath = entry.fullPath;
      files.push(file);
    }
    else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (let batch; (batch = await new Promise((ok, fail) => reader.readEntries(ok, fail))).length;) {
        for (const child of batch) await walk(child);
      }
    }
  }
  for (const entry of [...items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean)) {
    await walk(entry);
  }
  return files;
}

async function handleFiles(files) {
  files = [...files].filter((f) => !f.name.startsWith("."));
  if (!files.length) return;
  if (files.length === 1 && !isStudyFile(files[0])) return analyse(files[0]);
  if (files.length === 1) return analyseStudy(files[0], files[0].name);
  $("status").className = "muted";
  $("status").textContent = `Packing ${files.length} files…`;
  return analyseStudy(await zipFiles(files), `${files.length} files`);
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => handleFiles(event.target.files));
  $("folder").addEventListener("change", (event) => handleFiles(event.target.files));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    handleFiles(await filesFromDrop(event.dataTransfer.items));
  });
  $("stage").addEventListener("wheel", (event) => {
    event.preventDefault();
    showSlice(viewer.index + Math.sign(event.deltaY));
  }, { passive: false });
  $("stage").addEventListener("keydown", (event) => {
    const step = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1 }[event.key];
    if (step) { event.preventDefault(); showSlice(viewer.index + step); }
  });
  $("strip").addEventListener("click", (event) => {
    const cell = event.target.closest(".cell");
    if (cell) showSlice(Number(cell.dataset.index));
  });
  for (const button of document.querySelectorAll("button.window")) {
    button.addEventListener("click", () => {
      viewer.window = button.dataset.window;
      document.querySelectorAll("button.window").forEach((b) => b.classList.toggle("active", b === button));
      showSlice(viewer.index);
    });
  }
  $("cam-toggle").addEventListener("change", (event) => { viewer.cam = event.target.checked; loadCam(); });
  fetch("/v1/model").then((r) => r.json()).then((model) => {
    $("model-line").textContent = `${model.architecture} · classes: ${model.class_names.join(", ")} · ` +
      `input ${model.input_size} px · version ${model.version}`;
  }).catch(() => { $("model-line").textContent = "model information unavailable"; });
}

setUp();
