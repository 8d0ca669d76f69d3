// nanoseek chat page: plain JS, no build step, no external resources, nothing inline (the server's CSP allows
// scripts and styles from its own address only).
// Talks to the same server's /v1/chat/completions with stream=true and parses the SSE stream by hand
// (EventSource cannot POST): `data: {chunk}` events, `: comment` keep-alives, `data: [DONE]` at the end.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  conversation: $("conversation"), empty: $("empty"), prompt: $("prompt"), composer: $("composer"),
  send: $("send"), stop: $("stop"), think: $("think-toggle"), status: $("status"), model: $("model-name"),
  newChat: $("new-chat"), settingsToggle: $("settings-toggle"), settings: $("settings"),
  temperature: $("temperature"), temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"),
  apiKey: $("api-key"), system: $("system-prompt"),
};

// ------------------------------------------------------------------ settings kept in localStorage
const STORE = "nanoseek.settings";
const settings = Object.assign(
  { temperature: 0.6, maxTokens: 512, apiKey: "", system: "", thinking: true },
  JSON.parse(localStorage.getItem(STORE) || "{}"),
);
function saveSettings() { localStorage.setItem(STORE, JSON.stringify(settings)); }

function showSettings() {
  els.temperature.value = settings.temperature;
  els.temperatureValue.textContent = Number(settings.temperature).toFixed(2);
  els.maxTokens.value = settings.maxTokens;
  els.apiKey.value = settings.apiKey;
  els.system.value = settings.system;
  els.think.setAttribute("aria-pressed", String(settings.thinking));
}
els.temperature.addEventListener("input", () => {
  settings.temperature = Number(els.temperature.value);
  els.temperatureValue.textContent = settings.temperature.toFixed(2);
  saveSettings();
});
// The largest max_tokens the server accepts (GET v1/limits); a larger request would be refused.
let maxTokensLimit = null;
function clampMaxTokens(v) {
  v = Math.max(1, Math.floor(Number(v) || 512));
  return maxTokensLimit ? Math.min(v, maxTokensLimit) : v;
}
els.maxTokens.addEventListener("change", () => {
  const v = clampMaxTokens(els.maxTokens.value);
  settings.maxTokens = v; els.maxTokens.value = v; saveSettings();
});
els.apiKey.addEventListener("change", () => { settings.apiKey = els.apiKey.value.trim(); saveSettings(); loadModel(); });
els.system.addEventListener("change", () => { settings.system = els.system.value; saveSettings(); });
els.think.addEventListener("click", () => { settings.thinking = !settings.thinking; saveSettings(); showSettings(); });
els.settings.addEventListener("submit", (ev) => ev.preventDefault());   // (Enter in a field: nothing to send)
els.settingsToggle.addEventListener("click", () => {
  const open = els.settings.hidden;
  els.settings.hidden = !open;
  els.settingsToggle.setAttribute("aria-expanded", String(open));
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if (settings.apiKey) h.Authorization = "Bearer " + settings.apiKey;
  return h;
}

let modelId = null;
async function loadModel() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelId = body.data[0].id;
    els.model.textContent = modelId;
    els.model.title = "served model" + (body.data[0].max_model_len ? ", context " + body.data[0].max_model_len : "");
    await loadLimits();
  } catch (e) {
    els.model.textContent = "(not connected)";
    setStatus(String(e.message || e), true);
  }
}

async function loadLimits() {
  const r = await fetch("v1/limits", { headers: headers() });
  if (!r.ok) return;                    // an older server: keep the field as it is
  const limits = await r.json();
  maxTokensLimit = limits.max_tokens;
  els.maxTokens.max = String(maxTokensLimit);
  const v = clampMaxTokens(settings.maxTokens);
  if (v !== settings.maxTokens) { settings.maxTokens = v; saveSettings(); }
  els.maxTokens.value = v;
}

// ------------------------------------------------------------------ conversation
let history = [];           // [{role, content}] sent back to the server (reasoning is not sent back, as DeepSeek asks)
let controller = null;      // AbortController of the answer being streamed

function setStatus(text, isError) {
  els.status.textContent = text || "";
  els.status.classList.toggle("error", Boolean(isError));
}

function scrollDown() {
  const nearBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 160;
  if (nearBottom) window.scrollTo(0, document.body.scrollHeight);
}

function addMessage(role, text) {
  els.empty.hidden = true;
  const wrap = document.createElement("div");
  wrap.className = "msg " + role;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  if (role === "assistant") {
    const think = document.createElement("details");
    think.className = "thinking";
    think.hidden = true;
    think.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking…";
    const body = document.createElement("div");
    body.className = "thinking-text";
    think.append(summary, body);
    const answer = document.createElement("div");
    answer.className = "answer";
    const meta = document.createElement("div");
    meta.className = "meta";
    bubble.append(think, answer, meta);
    wrap.append(bubble);
    els.conversation.append(wrap);
    return { wrap, think, summary, thinkText: body, answer, meta };
  }
  bubble.textContent = text;
  wrap.append(bubble);
  els.conversation.append(wrap);
  return { wrap };
}

// The demo model answers `<think>...</think> <answer>X</answer>`: the answer shown is X. The tags are dropped for
// display only (the history sent back keeps the model's own text); while the answer streams, a tag still being
// written ("<ans") is held back, so it never flashes on screen.
const ANSWER_TAGS = ["<answer>", "</answer>"];
function displayAnswer(text, streaming) {
  let s = text;
  for (const tag of ANSWER_TAGS) s = s.split(tag).join("");
  if (streaming) {
    let held = 0;                       // the longest end of s that begins a tag
    for (const tag of ANSWER_TAGS) {
      for (let n = 1; n < tag.length; n++) if (s.endsWith(tag.slice(0, n))) held = Math.max(held, n);
    }
    s = s.slice(0, s.length - held);
  }
  return s.trim();
}

function setBusy(busy) {
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  els.prompt.disabled = false;
}

// Reads an SSE body and calls onEvent(json) for each `data:` event; resolves at [DONE] or end of stream.
async function readSSE(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;               // a ": keep-alive" comment
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

async function send(text) {
  if (controller) return;
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const view = addMessage("assistant");
  view.wrap.classList.add("streaming");
  scrollDown();
  const messages = settings.system ? [{ role: "system", content: settings.system }, ...history] : history;
  const body = {
    model: modelId || undefined, messages, stream: true, stream_options: { include_usage: true },
    temperature: settings.temperature, max_tokens: settings.maxTokens,
    thinking: { type: settings.thinking ? "enabled" : "disabled" },
  };
  controller = new AbortController();
  setBusy(true);
  setStatus("waiting…");
  const started = performance.now();
  let firstToken = null, thinkEnd = null, reasoning = "", answer = "", usage = null, finish = null;
  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { const e = await r.json(); if (e.error) msg = e.error.message; } catch (_) { /* not JSON */ }
      if (r.status === 401) msg += " (set the API key in Settings)";
      throw new Error(msg);
    }
    setStatus("generating…");
    await readSSE(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      const d = choice.delta || {};
      if (d.reasoning_content) {
        if (firstToken === null) firstToken = performance.now();
        reasoning += d.reasoning_content;
        view.think.hidden = false;
        view.thinkText.textContent = reasoning.trim();   // (R1 writes "<think>\n...\n</think>")
      }
      if (d.content) {
        if (firstToken === null) firstToken = performance.now();
        if (thinkEnd === null && reasoning) {
          thinkEnd = performance.now();
          view.summary.textContent = "Thought for " + ((thinkEnd - firstToken) / 1000).toFixed(1) + " s";
          view.think.open = false;        // collapse the reasoning once the answer starts
        }
        answer += d.content;
        view.answer.textContent = displayAnswer(answer, true);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      scrollDown();
    });
    view.answer.textContent = displayAnswer(answer, false);
    if (reasoning && thinkEnd === null) view.summary.textContent = "Thinking (" + reasoning.length + " chars)";
    const secs = (performance.now() - started) / 1000;
    const parts = [];
    if (usage) {
      parts.push(usage.completion_tokens + " tokens");
      if (secs > 0) parts.push((usage.completion_tokens / secs).toFixed(1) + " tok/s");
      if (usage.prompt_cache_hit_tokens) parts.push(usage.prompt_cache_hit_tokens + " prompt tokens from cache");
    }
    if (finish === "length") parts.push("stopped at max tokens");
    view.meta.textContent = parts.join(" · ");
    setStatus("");
  } catch (e) {
    if (e.name === "AbortError") {
      view.meta.textContent = "stopped";
      setStatus("");
    } else {
      view.wrap.classList.add("failed");
      view.meta.textContent = "error: " + (e.message || e);
      setStatus("error", true);
    }
  } finally {
    view.wrap.classList.remove("streaming");
    if (answer || reasoning) history.push({ role: "assistant", content: answer });
    else history.pop();               // nothing came back: let the user resend this turn
    controller = null;
    setBusy(false);
    els.prompt.focus();
  }
}

els.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = els.prompt.value.trim();
  if (!text || controller) return;
  els.prompt.value = "";
  autosize();
  send(text);
});
els.prompt.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    els.composer.requestSubmit();
  }
});
function autosize() {
  els.prompt.style.height = "auto";
  els.prompt.style.height = Math.min(els.prompt.scrollHeight, 200) + "px";
}
els.prompt.addEventListener("input", autosize);
els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
els.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  els.conversation.querySelectorAll(".msg").forEach((m) => m.remove());
  els.empty.hidden = false;
  setStatus("");
  els.prompt.focus();
});

showSettings();
loadModel();
els.prompt.focus();
