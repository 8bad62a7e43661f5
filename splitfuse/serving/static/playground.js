// The playground: streams /v1/completions or /v1/chat/completions into the page as it arrives.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "splitfuse.apiKey";
let modelName = null;
let controller = null; // AbortController of the request in flight
const SAMPLING_FIELDS = ["temperature", "top_p", "top_k"];

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

// OpenAI error JSON carries the message in error.message; anything else is shown as it came.
async function errorMessage(reply) {
  const text = await reply.text();
  let message = null;
  try { message = JSON.parse(text)?.error?.message; } catch { /* not JSON */ }
  return `${reply.status}: ${message || text || reply.statusText}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// Empty sampling fields send nothing, so the server uses the model's own defaults: say which.
function showSamplingDefaults(defaults) {
  for (const name of SAMPLING_FIELDS) {
    const value = defaults?.[name];
    $(name).placeholder = value === undefined ? "server default" : `${value} (model)`;
  }
}

async function loadModel() {
  try {
    const reply = await fetch("v1/models", { headers: headers() });
    if (reply.status === 401 && !$("api-key").value.trim()) {
      // A keyed server: ask for the key instead of greeting the user with an error.
      modelName = null;
      $("model").textContent = "enter the server's API key";
      $("api-key").focus();
      showError("");
      return;
    }
    if (!reply.ok) throw new Error(await errorMessage(reply));
    const model = (await reply.json()).data[0];
    modelName = model.id;
    $("model").textContent = modelName;
    showSamplingDefaults(model.sampling_defaults);
    showError("");
  } catch (err) {
    modelName = null;
    $("model").textContent = "model unknown";
    showError(err.message);
  }
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

// Stop strings are comma-separated; \n and \t may be written as escapes.
function stopStrings() {
  return $("stop").value.split(",")
    .map((s) => s.replaceAll("\\n", "\n").replaceAll("\\t", "\t"))
    .filter((s) => s !== "");
}

// The JSON-schema box: empty means unconstrained; text that is not JSON is reported before sending.
function jsonSchema() {
  const text = $("json_schema").value.trim();
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(`JSON schema: not valid JSON (${err.message})`);
  }
}

function requestBody(mode) {
  const body = {
    model: modelName ?? undefined, // undefined fields are left out, so the server's defaults apply
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: number("max_tokens"),
    temperature: number("temperature"),
    top_p: number("top_p"),
    top_k: number("top_k"),
    seed: number("seed"),
  };
  const stop = stopStrings();
  if (stop.length) body.stop = stop;
  const schema = jsonSchema();
  if (schema) body.response_format = { type: "json_schema", json_schema: { name: "playground", schema } };
  const prompt = $("prompt").value;
  if (mode === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  return body;
}

// Yields, for each network read, the parsed JSON of the `data:` lines it completed, until [DONE].
async function* eventBatches(reply) {
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const lines = (pending + value).split("\n");
    pending = lines.pop(); // a line cut between reads waits for the rest
    const batch = [];
    for (const line of lines) {
      if (!line.startsWith("data: ")) continue;
      const data = line.slice("data: ".length);
      if (data === "[DONE]") {
        yield batch;
        return;
      }
      batch.push(JSON.parse(data));
    }
    yield batch;
  }
}

// Tokens/s is the decode speed after the first text: the first token's wait is the prompt's (shown as time
// to first token), and tokens that came in the same read as it have no arrival time of their own.
function showStats(timing, tokens) {
  $("ttft").textContent = `${Math.round(timing.first - timing.start)} ms`;
  $("tokens").textContent = String(tokens);
  const decoded = tokens - timing.tokensAtFirst;
  const seconds = (timing.last - timing.first) / 1000;
  const rate = decoded > 0 && seconds > 0 ? decoded / seconds : tokens / ((timing.last - timing.start) / 1000);
  $("tps").textContent = rate.toFixed(1);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop-button").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

async function generate(event) {
  event.preventDefault();
  const mode = document.querySelector("input[name=mode]:checked").value;
  const path = mode === "chat" ? "v1/chat/completions" : "v1/completions";
  controller = new AbortController();
  setBusy(true);
  showError("");
  $("status").textContent = "";
  $("output").textContent = "";
  for (const id of ["ttft", "tokens", "tps"]) $(id).textContent = "–";
  const timing = { start: performance.now(), first: null, last: null, tokensAtFirst: 0 };
  let chunks = 0, finish = null, usage = null;
  try {
    const body = JSON.stringify(requestBody(mode));
    const reply = await fetch(path, {
      method: "POST", headers: headers(), body, signal: controller.signal,
    });
    if (!reply.ok) throw new Error(await errorMessage(reply));
    for await (const batch of eventBatches(reply)) {
      const now = performance.now();
      for (const chunk of batch) {
        if (chunk.error) throw new Error(chunk.error.message); // a failure after the headers were sent
        const choice = chunk.choices?.[0];
        const text = mode === "chat" ? choice?.delta?.content : choice?.text;
        finish = choice?.finish_reason ?? finish;
        usage = chunk.usage ?? usage;
        if (!text) continue;
        $("output").append(text); // a text node per chunk: no re-render of what came before
        chunks += 1;
        timing.last = now;
        if (timing.first === null) timing.first = now;
        if (timing.first === now) timing.tokensAtFirst = chunks;
      }
      // Text chunks stand for tokens until the usage chunk gives the exact count.
      if (timing.first !== null) showStats(timing, usage ? usage.completion_tokens : chunks);
    }
    $("status").textContent = finish ? `finished: ${finish}` : "finished";
  } catch (err) {
    if (err.name === "AbortError") $("status").textContent = "stopped";
    else showError(err.message);
  } finally {
    controller = null;
    setBusy(false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) ?? "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadModel();
  });
  $("form").addEventListener("submit", generate);
  $("stop-button").addEventListener("click", () => controller?.abort());
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
  loadModel();
});
