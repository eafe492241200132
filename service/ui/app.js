// The /ui page: classify dropped or chosen images with POST /classify, draw the top-k as bars, and
// show the Grad-CAM overlay from POST /explain when the service has that endpoint.
// Plain browser JavaScript, no build step and no external resources.
"use strict";

// The API's error codes (README "Using the API"), said in plain words.
const MESSAGES = {
  not_an_image: "This file is not an image the service can read. Send a JPEG, PNG, GIF, WebP, TIFF or BMP file.",
  corrupt_image: "This image file is damaged or cut short, so it could not be decoded.",
  empty_file: "This file is empty.",
  image_too_large: "This image has more pixels than the service accepts. Try a smaller image.",
  body_too_large: "This file is larger than the service accepts. Try a smaller file.",
  too_many_files: "Too many files were sent at once.",
  unknown_model: "The selected model is not served here. Reload the page to see the current models.",
  invalid_top_k: "The number of top classes must be at least 1.",
  invalid_request: "The service could not understand the request.",
  invalid_multipart: "The upload was malformed.",
  no_file: "No image arrived with the request.",
  unsupported_media_type: "The upload was not sent as a form with a file.",
  body_timeout: "The upload took too long to arrive and was cut off. Check the connection and try again.",
  overloaded: "The service is busy right now. Try again in a few seconds.",
  starting: "The service is still starting. Try again in a moment.",
  method_not_allowed: "The service refused this kind of request.",
  internal_error: "Something went wrong inside the service while answering.",
  not_explainable: "This model cannot draw a Grad-CAM explanation.",
  invalid_class: "The class to explain is not one of the model's classes.",
};
const NETWORK_MESSAGE = "The service could not be reached. Check that it is running.";

const state = { cards: {}, defaultModel: null, explain: "unknown" }; // explain: unknown | yes | no

const $ = (selector) => document.querySelector(selector);

/** Turn a failed response into {message, code}. */
async function describeError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) { /* not JSON */ }
  const code = body && typeof body.error === "string" ? body.error : `http_${response.status}`;
  const message = MESSAGES[code] || `The service refused the request (status ${response.status}).`;
  const detail = body && body.detail !== undefined
    ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : "";
  return { message, code, detail };
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function showNotice(text) {
  const notice = $("#notice");
  notice.textContent = text;
  notice.hidden = !text;
}

// --- models ---------------------------------------------------------------------------------------

function describeCard(card) {
  const parts = [];
  if (card.version) parts.push(`version <code>${escapeHtml(card.version)}</code>`);
  const accuracy = card.metrics && card.metrics.test_accuracy;
  if (typeof accuracy === "number") {
    const images = card.metrics.test_images ? ` on ${card.metrics.test_images} held-out images` : "";
    parts.push(`test accuracy <strong>${(100 * accuracy).toFixed(1)}%</strong>${images}`);
  }
  if (Array.isArray(card.classes)) {
    const shown = card.classes.slice(0, 12).map(escapeHtml).join(", ");
    parts.push(`${card.classes.length} classes: ${shown}${card.classes.length > 12 ? ", …" : ""}`);
  }
  return parts.join(" · ");
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function showCard() {
  const card = state.cards[$("#model").value];
  $("#card").innerHTML = card ? describeCard(card) : "";
}

async function loadModels() {
  let response;
  try {
    response = await fetch("../models", { headers: { Accept: "application/json" } });
  } catch (_) {
    showNotice(NETWORK_MESSAGE);
    return;
  }
  if (!response.ok) {
    const { message } = await describeError(response);
    showNotice(`The list of models could not be loaded: ${message}`);
    return;
  }
  const body = await response.json();
  state.cards = body.models || {};
  state.defaultModel = body.default;
  const select = $("#model");
  select.replaceChildren(...Object.keys(state.cards).sort().map((name) => {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    option.selected = name === body.default;
    return option;
  }));
  select.disabled = false;
  showCard();
  document.body.dataset.ready = "true";
}

// --- results --------------------------------------------------------------------------------------

function newResult(file, model) {
  const node = $("#result-template").content.firstElementChild.cloneNode(true);
  const preview = node.querySelector(".preview img");
  const url = URL.createObjectURL(file);
  preview.src = url;
  preview.addEventListener("load", () => { // a tiny image (CIFAR-10: 32x32) is shown as its pixels
    if (preview.naturalWidth < 80) preview.classList.add("small");
  });
  preview.addEventListener("error", () => {
    preview.replaceWith(Object.assign(document.createElement("div"), { className: "no-preview", textContent: "no preview" }));
  });
  node.querySelector(".name").textContent = file.name;
  node.dataset.model = model;
  $("#results").prepend(node);
  $("#clear").hidden = false;
  return node;
}

function drawBars(list, topK) {
  list.replaceChildren(...topK.map(({ label, probability }) => {
    const item = document.createElement("li");
    item.className = "bar";
    item.dataset.label = label;
    item.dataset.probability = String(probability);
    const name = Object.assign(document.createElement("span"), { className: "bar-label", textContent: label });
    const track = Object.assign(document.createElement("span"), { className: "bar-track" });
    const fill = Object.assign(document.createElement("span"), { className: "bar-fill" });
    fill.style.width = `${Math.max(0, Math.min(1, probability)) * 100}%`;
    track.append(fill);
    const value = Object.assign(document.createElement("span"), { className: "bar-value", textContent: percent(probability) });
    item.append(name, track, value);
    return item;
  }));
}

function showError(node, { message, code, detail }) {
  node.classList.remove("pending");
  node.classList.add("failed", "done");
  node.querySelector(".status").hidden = true;
  const error = node.querySelector(".error");
  error.textContent = message;
  error.hidden = false;
  const technical = node.querySelector(".error-code");
  technical.textContent = detail ? `${code}: ${detail}` : code;
  technical.hidden = false;
}

function form(file, model, extra = {}) {
  const data = new FormData();
  data.append("image", file, file.name);
  data.append("model", model);
  for (const [key, value] of Object.entries(extra)) data.append(key, value);
  return data;
}

async function classify(file, model, topK) {
  const node = newResult(file, model);
  let response;
  try {
    response = await fetch("../classify", { method: "POST", body: form(file, model, { top_k: String(topK) }) });
  } catch (_) {
    showError(node, { message: NETWORK_MESSAGE, code: "network", detail: "" });
    return;
  }
  if (!response.ok) {
    showError(node, await describeError(response));
    return;
  }
  const result = await response.json();
  node.classList.remove("pending");
  node.querySelector(".status").hidden = true;
  node.querySelector(".label").textContent = result.label;
  const accuracy = state.cards[result.model] && state.cards[result.model].metrics
    ? state.cards[result.model].metrics.test_accuracy : undefined;
  node.querySelector(".meta").textContent = `${result.model} · version ${result.version}`
    + (typeof accuracy === "number" ? ` · test accuracy ${(100 * accuracy).toFixed(1)}%` : "");
  drawBars(node.querySelector(".bars"), result.top_k);
  showOod(node, result, state.cards[result.model]);
  await explain(node, file, model);
  node.classList.add("done");
}

/** Mark an answer the model judged out of distribution (`in_distribution: false`; answers of a
 * model without an OOD score carry neither field). */
function showOod(node, result, card) {
  const note = node.querySelector(".ood");
  if (result.in_distribution !== false) return;
  const classes = card && Array.isArray(card.classes) ? card.classes : Object.keys(result.probabilities);
  note.textContent = `This does not look like any of: ${classes.join(", ")}. `
    + `The answer below is the closest class, not a recognition (out-of-distribution score ${result.ood_score.toFixed(1)}`
    + (card && card.ood ? `, threshold ${card.ood.threshold.toFixed(1)})` : ")");
  note.hidden = false;
  node.classList.add("out-of-distribution");
}

/** Ask /explain for the Grad-CAM overlay; a 404/405 means this service has no such endpoint. */
async function explain(node, file, model) {
  if (state.explain === "no") return;
  const figure = node.querySelector(".gradcam");
  let response;
  try {
    response = await fetch("../explain", { method: "POST", body: form(file, model) });
  } catch (_) {
    return;
  }
  if (response.status === 404 || response.status === 405) {
    let code = null;
    try { code = (await response.json()).error; } catch (_) { /* a plain "Not Found": no route */ }
    if (code !== "unknown_model") {
      state.explain = "no";
      document.querySelectorAll(".gradcam").forEach((f) => { f.hidden = true; });
      return;
    }
  }
  if (!response.ok) {
    const { message } = await describeError(response);
    figure.querySelector("figcaption").textContent = `No Grad-CAM: ${message}`;
    figure.querySelector("img").remove();
    figure.hidden = false;
    return;
  }
  state.explain = "yes";
  const img = figure.querySelector("img");
  const loaded = new Promise((resolve) => { img.onload = img.onerror = resolve; });
  img.src = URL.createObjectURL(await response.blob());
  figure.hidden = false;
  await loaded;
}

// --- input ----------------------------------------------------------------------------------------

async function addFiles(files) {
  const model = $("#model").value;
  if (!model || !state.cards[model]) {
    showNotice("The models are not loaded yet; wait a moment and try again.");
    return;
  }
  const topK = Math.max(1, parseInt($("#top-k").value, 10) || 5);
  // One request per file, a few at a time, so that each image gets its own answer or error.
  const queue = Array.from(files);
  const worker = async () => {
    while (queue.length) await classify(queue.shift(), model, topK);
  };
  await Promise.all([worker(), worker(), worker()]);
}

function setUp() {
  const drop = $("#drop");
  const input = $("#files");
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") input.click();
  });
  $("#model").addEventListener("change", showCard);
  $("#clear").addEventListener("click", () => {
    $("#results").replaceChildren();
    $("#clear").hidden = true;
  });
  loadModels();
}

setUp();
