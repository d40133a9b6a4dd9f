// The playground page of `lorakit serve`: plain JavaScript, no build step, no other origin.
// It uses only the server's public API; the API key (if the server has one) is kept in this
// tab's sessionStorage and sent as "Authorization: Bearer KEY" on every API call.
"use strict";

const KEY_STORAGE = "lorakit-playground-api-key";
const BASE = "base"; // the server's name for the base model alone
const WEIGHT_MIN = -1;
const WEIGHT_MAX = 2;
const WEIGHT_STEP = 0.05;

const $ = (id) => document.getElementById(id);
let running = null; // the AbortController of the stream in progress

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function apiHeaders(hasBody) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (hasBody) headers["Content-Type"] = "application/json";
  return headers;
}

// The server's JSON error message ({"error": {"message": ...}}), else the status text.
async function errorOf(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    message = body.error && body.error.message ? body.error.message : JSON.stringify(body);
  } catch (_) {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, message);
}

async function callApi(path, body, signal) {
  const init = { headers: apiHeaders(body !== undefined), signal };
  if (body !== undefined) {
    init.method = "POST";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response;
}

function showError(error) {
  $("error-status").textContent = error.status ? `${error.status}` : "";
  $("error-message").textContent = error.message;
  $("error").hidden = false;
  if (error.status === 401) $("key-section").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-status").textContent = "";
  $("error-message").textContent = "";
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

// Reads the server's task and models, then shows the form that task uses.
async function connect() {
  clearError();
  try {
    const health = await (await callApi("/health")).json();
    const models = await (await callApi("/v1/models")).json();
    showModels(health.task, models.data.map((model) => model.id));
  } catch (error) {
    $("workspace").hidden = true;
    $("server-info").textContent = "";
    showError(error);
  }
}

function showModels(task, names) {
  const adapters = names.filter((name) => name !== BASE);
  const select = $("model");
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  if (adapters.length > 0) select.value = adapters[0];
  const sliders = adapters.map(makeSlider);
  $("sliders").replaceChildren(...sliders);
  updateBlendSummary();
  const isClassifier = task === "seq_cls";
  $("mode-blend").disabled = isClassifier || adapters.length === 0;
  if (isClassifier) chooseMode("single");
  $("completion-form").hidden = isClassifier;
  $("classification-form").hidden = !isClassifier;
  const kind = isClassifier ? "sequence classifier" : "causal LM";
  $("server-info").textContent = `${kind} · ${adapters.length} adapter(s)`;
  $("workspace").hidden = false;
}

function makeSlider(name) {
  const row = document.createElement("div");
  row.className = "slider";
  const label = document.createElement("label");
  const input = document.createElement("input");
  const output = document.createElement("output");
  input.type = "range";
  input.id = `weight-${name}`;
  input.min = WEIGHT_MIN;
  input.max = WEIGHT_MAX;
  input.step = WEIGHT_STEP;
  input.value = 0;
  input.dataset.adapter = name;
  label.htmlFor = input.id;
  label.textContent = name;
  output.textContent = "0.00";
  input.addEventListener("input", () => {
    output.textContent = Number(input.value).toFixed(2);
    updateBlendSummary();
  });
  row.append(label, input, output);
  return row;
}

function blendWeights() {
  const weights = {};
  for (const input of $("sliders").querySelectorAll("input[type=range]")) {
    const weight = Number(input.value);
    if (weight !== 0) weights[input.dataset.adapter] = weight;
  }
  return weights;
}

function updateBlendSummary() {
  const weights = Object.entries(blendWeights());
  $("blend-summary").textContent =
    weights.length === 0
      ? "All weights are zero: the base model."
      : weights.map(([name, weight]) => `${name} × ${weight}`).join(" + ");
}

function chooseMode(mode) {
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.checked = radio.value === mode;
  }
  $("single-choice").hidden = mode !== "single";
  $("blend-choice").hidden = mode !== "blend";
}

function currentMode() {
  return document.querySelector("input[name=mode]:checked").value;
}

// The request's model fields: one adapter (or the base), or the base with a blend.
function modelFields() {
  if (currentMode() === "single") return { model: $("model").value };
  const weights = blendWeights();
  if (Object.keys(weights).length === 0) return { model: BASE };
  return { model: BASE, lorakit: { blend: weights } };
}

// Server-sent events: yields each event's data ("data: ..." lines joined).
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end = buffer.indexOf("\n\n");
    while (end >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
      end = buffer.indexOf("\n\n");
    }
  }
}

function setRunning(controller) {
  running = controller;
  $("generate").disabled = controller !== null;
  $("stop").disabled = controller === null;
}

async function generate() {
  if (running) return;
  clearError();
  const request = {
    ...modelFields(),
    prompt: $("prompt").value,
    max_tokens: parseInt($("max-tokens").value, 10),
    temperature: parseFloat($("temperature").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const output = $("output");
  output.textContent = "";
  setStatus("streaming", "Streaming…");
  const controller = new AbortController();
  setRunning(controller);
  let finishReason = null;
  let usage = null;
  let isComplete = false;
  try {
    const response = await callApi("/v1/completions", request, controller.signal);
    for await (const data of serverSentEvents(response.body)) {
      if (data === "[DONE]") {
        isComplete = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        output.textContent += choice.text;
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
    if (!isComplete) throw new ApiError(0, "the stream ended before [DONE] (server stopped?)");
    if (finishReason === "error") throw new ApiError(0, "the server failed on this request (see its log)");
    const tokens = usage ? `, ${usage.completion_tokens} tokens` : "";
    setStatus("done", `Done (${finishReason}${tokens}).`);
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("stopped", "Stopped.");
    } else {
      setStatus("error", "Failed.");
      showError(error);
    }
  } finally {
    setRunning(null);
  }
}

async function classify() {
  clearError();
  $("classify").disabled = true;
  try {
    const request = { model: $("model").value, input: $("text").value };
    const answer = await (await callApi("/v1/classifications", request)).json();
    const result = answer.data[0];
    $("label").textContent = result.label;
    const rows = Object.entries(result.scores)
      .sort((a, b) => b[1] - a[1])
      .map(([label, score]) => {
        const row = document.createElement("tr");
        for (const text of [label, score.toFixed(4)]) {
          const cell = document.createElement("td");
          cell.textContent = text;
          row.append(cell);
        }
        return row;
      });
    $("scores").tBodies[0].replaceChildren(...rows);
  } catch (error) {
    showError(error);
  } finally {
    $("classify").disabled = false;
  }
}

function saveKeyAndConnect() {
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  connect();
}

function start() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) {
    $("api-key").value = key;
    $("key-section").hidden = false;
  }
  $("connect").addEventListener("click", saveKeyAndConnect);
  $("api-key").addEventListener("keydown", (event) => {
    if (event.key === "Enter") saveKeyAndConnect();
  });
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => chooseMode(radio.value));
  }
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => running && running.abort());
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
  });
  $("classify").addEventListener("click", classify);
  connect();
}

start();
