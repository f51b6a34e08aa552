// padengine playground: the page at GET /. It owns the form (prompt, weighted preference rows, PAD knobs),
// sends two streaming requests to this server's own /v1/chat/completions (base: no preference; PAD: the
// preferences), parses their server-sent events, and shows each answer with its time to first token and
// tokens/s. The server does all validation: fields are sent as typed, and a refused request shows the API's
// error.message in its pane. Nothing is loaded from anywhere but this server.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

// ---- the form ----

function addPreference(text = "", weight = "") {
  const row = $("pref-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".pref-text").value = text;
  row.querySelector(".pref-weight").value = weight;
  row.querySelector(".remove").addEventListener("click", () => row.remove());
  $("prefs").appendChild(row);
}

// A number field's value for the request: omitted when blank, a number when it reads as one, else the text
// itself, so that the server's refusal (naming the field) is what the user sees.
function numberField(text) {
  const s = text.trim();
  if (s === "") return undefined;
  const n = Number(s);
  return Number.isFinite(n) ? n : s;
}

function preferences() {
  const out = [];
  for (const row of $("prefs").querySelectorAll(".pref")) {
    const text = row.querySelector(".pref-text").value;
    const weight = numberField(row.querySelector(".pref-weight").value);
    if (text.trim() === "" && weight === undefined) continue;    // an untouched empty row
    out.push(weight === undefined ? { text } : { text, weight });
  }
  return out;
}

function requests() {
  const common = {
    model,
    messages: [{ role: "user", content: $("prompt").value }],
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberField($("temperature").value),
    max_tokens: numberField($("max_tokens").value),
    seed: numberField($("seed").value),
    pad_top_k: numberField($("pad_top_k").value),   // the base decodes from the same top-k
  };
  const pad = {
    ...common,
    preference: preferences(),
    pad_weight: numberField($("pad_weight").value),
    preference_in_base: $("preference_in_base").checked,
  };
  return { base: common, pad };
}

// ---- one pane: a streamed request ----

function show(pane, state, text, stats) {
  pane.dataset.state = state;
  const out = pane.querySelector(".out");
  out.classList.toggle("error", state === "error");
  if (text !== undefined) out.textContent = text;
  if (stats !== undefined) pane.querySelector(".stats").textContent = stats;
}

async function errorMessage(resp) {
  const raw = await resp.text();
  try {
    return JSON.parse(raw).error.message;
  } catch (e) {
    return raw || resp.statusText;
  }
}

// Yield the JSON of every `data:` line of a server-sent event stream, until `data: [DONE]`.
async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop();                       // a partial line waits for the next read
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function stream(pane, body) {
  show(pane, "running", "", "waiting for the first token…");
  const start = performance.now();
  let first = null, chunks = 0, usage = null, finish = null, text = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!resp.ok) {
      show(pane, "error", await errorMessage(resp), `refused: HTTP ${resp.status}`);
      return;
    }
    for await (const ev of events(resp)) {
      if (ev.usage) usage = ev.usage;
      const choice = ev.choices && ev.choices[0];
      if (!choice) continue;
      if (first === null) first = performance.now();   // the server sends its first chunk with the first token
      if (choice.finish_reason) finish = choice.finish_reason;
      const piece = choice.delta && choice.delta.content;
      if (!piece) continue;
      chunks += 1;
      text += piece;
      show(pane, "running", text, stats(start, first, performance.now(), chunks, null));
    }
  } catch (e) {
    show(pane, "error", `request failed: ${e.message}`, "");
    return;
  }
  show(pane, "done", text, stats(start, first, performance.now(), usage ? usage.completion_tokens : chunks,
                                 finish));
}

// Time to first token from the request's start; tokens/s over the tokens after the first (decode speed).
// While streaming, and without usage, the count is of text chunks (a chunk can hold several tokens).
function stats(start, first, end, tokens, finish) {
  if (first === null) return `no answer · finished: ${finish}`;
  const parts = [`${tokens} tokens`, `${Math.round(first - start)} ms to first token`,
    tokens > 1 && end > first ? `${((tokens - 1) / ((end - first) / 1000)).toFixed(1)} tokens/s` : "– tokens/s"];
  if (finish) parts.push(`finished: ${finish}`);
  return parts.join(" · ");
}

// ---- wiring ----

async function loadModel() {
  try {
    const resp = await fetch("/v1/models");
    model = (await resp.json()).data[0].id;
    $("model").textContent = `model: ${model}`;
  } catch (e) {
    $("model").textContent = `could not read /v1/models: ${e.message}`;
  }
}

async function run(event) {
  event.preventDefault();
  if (model === null) await loadModel();
  const { base, pad } = requests();
  $("run").disabled = true;
  try {
    await Promise.all([stream($("base"), base), stream($("pad"), pad)]);
  } finally {
    $("run").disabled = false;
  }
}

$("add-pref").addEventListener("click", () => addPreference());
$("form").addEventListener("submit", run);
addPreference("Be extremely concise: one short sentence.");
loadModel();
