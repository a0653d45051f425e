// covidseg-tf viewer: plain JavaScript, no library. The server (covidseg_tf/viewer.py) does all the numbers;
// this page only draws what it answers: the X-ray, the mask PNGs as coloured layers, and the JSON record.
"use strict";

const $ = (id) => document.getElementById(id);
const DISPLAY_HEIGHT = 560;
const RESULT_WIDTH = 400;  // px kept for the result panel beside the picture (#result is 20em)
const state = { colours: null, sort: "total", order: "desc", current: null, masks: {} };

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot load ${url}`));
    img.src = url;
  });
}

function percent(value) {
  return value === null || value === undefined ? "\u2013" : `${value.toFixed(1)} %`;
}

// A mask PNG (0 / 255) as a boolean array at the image's size.
function maskBits(img) {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const px = ctx.getImageData(0, 0, c.width, c.height).data;
  const bits = new Uint8Array(c.width * c.height);
  for (let i = 0; i < bits.length; i++) bits[i] = px[4 * i] > 127 ? 1 : 0;
  return { bits, width: c.width, height: c.height };
}

// The overlay canvas: lung pixels in the lung colour, infection pixels (drawn last) in the infection colour, the
// rest transparent. Opacity is the canvas's CSS opacity, so its pixels keep the exact colours.
function drawOverlay() {
  const canvas = $("overlay");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const layers = [["lung", $("show-lung").checked], ["infection", $("show-infection").checked]];
  const image = ctx.createImageData(canvas.width, canvas.height);
  for (const [kind, shown] of layers) {
    const mask = state.masks[kind];
    if (!shown || !mask || mask.width !== canvas.width || mask.height !== canvas.height) continue;
    const [r, g, b] = state.colours[kind];
    for (let i = 0; i < mask.bits.length; i++) {
      if (!mask.bits[i]) continue;
      image.data[4 * i] = r; image.data[4 * i + 1] = g; image.data[4 * i + 2] = b; image.data[4 * i + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
  canvas.style.opacity = $("opacity").value / 100;
}

async function show(result, title) {
  const record = result.record;
  // the base picture: the decoded X-ray, else predict's overlay PNG (its layers drawn in)
  const baseUrl = result.xray || result.links.overlay;
  const layered = Boolean(result.xray);
  const [base, lung, infection] = await Promise.all([
    baseUrl ? loadImage(baseUrl) : Promise.resolve(null),
    layered && result.links.lung ? loadImage(result.links.lung) : Promise.resolve(null),
    layered && result.links.infection ? loadImage(result.links.infection) : Promise.resolve(null),
  ]);
  const xray = $("xray"), overlay = $("overlay");
  xray.width = overlay.width = base ? base.naturalWidth : 1;
  xray.height = overlay.height = base ? base.naturalHeight : 1;
  if (base) xray.getContext("2d").drawImage(base, 0, 0);
  // shown at most DISPLAY_HEIGHT px high and as wide as the page allows (a small image is enlarged)
  const room = $("view").clientWidth - RESULT_WIDTH;
  const scale = Math.min(DISPLAY_HEIGHT / xray.height, room / xray.width);
  xray.style.width = `${Math.round(xray.width * scale)}px`;
  state.masks = { lung: lung && maskBits(lung), infection: infection && maskBits(infection) };
  for (const id of ["show-lung", "show-infection", "opacity"]) $(id).disabled = !layered;
  $("layer-note").textContent = layered ? "" :
    "the X-ray is not inside the folder: showing predict's overlay, its layers drawn in";
  drawOverlay();

  $("title").textContent = title;
  $("size").textContent = `${record.size.width} \u00d7 ${record.size.height} px` +
    (record.input_sha256 ? `, SHA-256 ${record.input_sha256.slice(0, 12)}\u2026` : "");
  const sev = record.severity;
  for (const side of ["right", "left", "total"]) {
    const cell = $(`sev-${side}`);
    cell.textContent = percent(sev[side]);
    cell.dataset.value = sev[side] === null ? "" : String(sev[side]);
  }
  $("sev-grade").textContent = sev.grade || "\u2013";
  const assessed = $("assessed");
  assessed.textContent = record.assessed ? "assessed" : `not assessed: ${record.reason}`;
  assessed.className = record.assessed ? "" : "refused";
  const level = record.image_level;
  $("image-level").textContent = level ?
    `image-level head: COVID-19 probability ${level.infection_probability.toFixed(3)}, class ${level.class}` : "";
  const m = record.models || {};
  const model = (s) => s ? `${(s.path || "?").split("/").slice(-3).join("/")} (${s.format})` : "?";
  $("models").textContent = `models: lung ${model(m.lung)}, infection ${model(m.infection)}; ` +
    `covidseg_tf ${m.covidseg_tf || "?"}` + (m.decision ? `; decision threshold ${m.decision.threshold}` : "");
  const names = { lung: "lung mask (PNG)", infection: "infection mask (PNG)", overlay: "overlay (PNG)",
                  json: "JSON record", seg: "DICOM SEG", sr: "DICOM SR (TID 1500)" };
  const links = $("links");
  links.replaceChildren();
  for (const [kind, text] of Object.entries(names)) {
    if (!result.links[kind]) continue;
    const a = document.createElement("a");
    a.href = result.links[kind]; a.textContent = text; a.target = "_blank";
    const li = document.createElement("li");
    li.append(a);
    links.append(li);
  }
  if (result.dicom_error) {
    const li = document.createElement("li");
    li.textContent = `no DICOM SEG / SR: ${result.dicom_error}`;
    links.append(li);
  }
  $("result").hidden = false;
  document.body.dataset.shown = title;  // for tests: the result on screen
}

async function upload(file) {
  setStatus(`predicting ${file.name}\u2026`, false);
  document.body.dataset.shown = "";
  try {
    const result = await getJSON(`/api/predict?name=${encodeURIComponent(file.name)}`,
      { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } });
    await show(result, file.name);
    setStatus(`${file.name}: done`, false);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function openRecord(rel, row) {
  document.querySelectorAll("#list tr.current").forEach((r) => r.classList.remove("current"));
  if (row) row.classList.add("current");
  try {
    const result = await getJSON(`/api/record/${rel.split("/").map(encodeURIComponent).join("/")}`);
    await show(result, rel);
    setStatus("", false);
  } catch (e) {
    setStatus(`${rel}: ${e.message}`, true);
  }
}

async function loadFolder() {
  const data = await getJSON(`/api/folder?sort=${state.sort}&order=${state.order}`);
  $("folder").hidden = false;
  $("folder-name").textContent = data.folder;
  document.querySelectorAll("#list th[data-sort]").forEach((th) => {
    th.className = th.dataset.sort === state.sort ? `sorted-${state.order}` : "";
  });
  const body = document.querySelector("#list tbody");
  body.replaceChildren();
  for (const e of data.entries) {
    const tr = document.createElement("tr");
    tr.dataset.record = e.record;
    const cells = [[e.record.replace(/\.json$/, ""), "name"], [percent(e.right), "num"], [percent(e.left), "num"],
                   [percent(e.total), "num"], [e.assessed ? e.grade : "not assessed", ""]];
    for (const [text, cls] of cells) {
      const td = document.createElement("td");
      td.textContent = text; td.className = cls;
      if (cls === "name") td.title = e.file;
      tr.append(td);
    }
    if (!e.assessed) tr.title = e.reason;
    tr.addEventListener("click", () => openRecord(e.record, tr));
    body.append(tr);
  }
  if (!data.entries.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = 5; td.textContent = "no predict records (*.json) in this folder";
    tr.append(td); body.append(tr);
  }
}

async function init() {
  const info = await getJSON("/api/info");
  state.colours = info.colours;
  $("lung-swatch").style.background = `rgb(${info.colours.lung})`;
  $("infection-swatch").style.background = `rgb(${info.colours.infection})`;
  $("file").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
  for (const id of ["show-lung", "show-infection", "opacity"]) $(id).addEventListener("input", drawOverlay);
  document.querySelectorAll("#list th[data-sort]").forEach((th) => th.addEventListener("click", () => {
    const key = th.dataset.sort;
    state.order = key === state.sort && state.order === "desc" ? "asc" : "desc";
    state.sort = key;
    loadFolder().catch((e) => setStatus(e.message, true));
  }));
  if (!info.models) { $("file").disabled = true; setStatus("no models loaded: uploads are off", true); }
  if (info.folder !== null) await loadFolder();
  document.body.dataset.ready = "1";
}

init().catch((e) => setStatus(e.message, true));
