// nanoseek chat page: plain JS, no build step, no external resources, nothing inline (the server's CSP allows
// scripts and styles from its own address only).
// Talks to the same server's /v1/chat/completions with stream=true and parses the SSE stream by hand
// (EventSource cannot POST): `data: {chunk}` events, `: comment` keep-alives, `data: [DONE]` at the end.
// When the server keeps a chat history (GET ui/conversations answers), a sidebar lists the conversations of this
// API key and each turn goes through ui/chat instead, which sends the same stream and stores the turn (ui.py).
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  conversation: $("conversation"), empty: $("empty"), prompt: $("prompt"), composer: $("composer"),
  send: $("send"), stop: $("stop"), think: $("think-toggle"), status: $("status"), model: $("model-name"),
  newChat: $("new-chat"), settingsToggle: $("settings-toggle"), settings: $("settings"),
  temperature: $("temperature"), temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"),
  apiKey: $("api-key"), system: $("system-prompt"),
  sidebar: $("sidebar"), sidebarToggle: $("sidebar-toggle"), sidebarClose: $("sidebar-close"), scrim: $("scrim"),
  search: $("search"), conversations: $("conversations"), conversationsEmpty: $("conversations-empty"),
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
els.apiKey.addEventListener("change", () => {
  settings.apiKey = els.apiKey.value.trim(); saveSettings(); loadModel(); newChat(); loadConversations();
});
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
let historyOn = false;      // the server keeps conversations (then the turns go through ui/chat, which stores them)
let currentId = null;       // the stored conversation on screen (null: a new chat, stored at its first answer)

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
  const request = historyOn ? pageTurn(text) : apiTurn();
  controller = new AbortController();
  setBusy(true);
  setStatus("waiting…");
  const started = performance.now();
  let firstToken = null, thinkEnd = null, reasoning = "", answer = "", usage = null, finish = null;
  try {
    const r = await fetch(request.url, {
      method: "POST", headers: headers(), body: JSON.stringify(request.body), signal: controller.signal,
    });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { const e = await r.json(); if (e.error) msg = e.error.message; } catch (_) { /* not JSON */ }
      if (r.status === 401) msg += " (set the API key in Settings)";
      throw new Error(msg);
    }
    if (historyOn && r.headers.get("X-Conversation-Id")) currentId = r.headers.get("X-Conversation-Id");
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
    if (historyOn) loadConversations();
  }
}

// A turn without stored history: the whole conversation goes to the API.
function apiTurn() {
  const messages = settings.system ? [{ role: "system", content: settings.system }, ...history] : history;
  return { url: "v1/chat/completions", body: {
    model: modelId || undefined, messages, stream: true, stream_options: { include_usage: true },
    temperature: settings.temperature, max_tokens: settings.maxTokens,
    thinking: { type: settings.thinking ? "enabled" : "disabled" },
  } };
}

// A turn of a stored conversation: the server adds the messages it keeps (and stores this turn).
function pageTurn(text) {
  return { url: "ui/chat", body: {
    conversation_id: currentId || undefined, content: text, system: settings.system || undefined,
    thinking: settings.thinking, temperature: settings.temperature, max_tokens: settings.maxTokens,
  } };
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
function clearConversation() {
  if (controller) controller.abort();
  history = [];
  els.conversation.querySelectorAll(".msg").forEach((m) => m.remove());
  els.empty.hidden = false;
  setStatus("");
}
function newChat() {
  clearConversation();
  currentId = null;
  markActive();
  setSidebar(false);
  els.prompt.focus();
}
els.newChat.addEventListener("click", newChat);

// ------------------------------------------------------------------ stored conversations (the sidebar)
async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error(data.error ? data.error.message : r.status + " " + r.statusText);
    err.code = data.error && data.error.code;
    throw err;
  }
  return data;
}

let listed = 0;             // (a newer listing wins over a slower older one)
async function loadConversations() {
  const mine = ++listed;
  const q = els.search.value.trim();
  try {
    const body = await api("GET", "ui/conversations" + (q ? "?q=" + encodeURIComponent(q) : ""));
    if (mine !== listed) return;
    setHistoryOn(true);
    renderConversations(body.data, q);
  } catch (e) {
    if (e.code === "history_disabled") setHistoryOn(false);
    else if (mine === listed) renderConversations([], q, String(e.message || e));
  }
}

function setHistoryOn(on) {
  historyOn = on;
  document.body.classList.toggle("has-history", on);
  els.sidebar.hidden = !on;
  els.sidebarToggle.hidden = !on;
}

function renderConversations(list, q, error) {
  els.conversations.replaceChildren(...list.map(conversationItem));
  els.conversationsEmpty.hidden = list.length > 0;
  els.conversationsEmpty.textContent = error || (q ? "Nothing matches." : "No conversations yet.");
  markActive();
}

function conversationItem(conv) {
  const li = document.createElement("li");
  li.className = "conv";
  li.dataset.id = conv.id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "conv-title";
  open.textContent = conv.title || "New chat";
  open.title = conv.title || "New chat";
  open.addEventListener("click", () => openConversation(conv.id));
  const rename = document.createElement("button");
  rename.type = "button";
  rename.className = "icon conv-rename";
  rename.title = "Rename";
  rename.setAttribute("aria-label", "Rename");
  rename.textContent = "✎";
  rename.addEventListener("click", () => startRename(li, conv));
  const del = document.createElement("button");
  del.type = "button";
  del.className = "icon conv-delete";
  del.title = "Delete";
  del.setAttribute("aria-label", "Delete");
  del.textContent = "×";
  del.addEventListener("click", () => deleteConversation(conv));
  li.append(open, rename, del);
  return li;
}

function markActive() {
  els.conversations.querySelectorAll(".conv").forEach((li) => li.classList.toggle("active", li.dataset.id === currentId));
}

async function openConversation(id) {
  try {
    const conv = await api("GET", "ui/conversations/" + encodeURIComponent(id));
    clearConversation();
    currentId = conv.id;
    conv.messages.forEach(showStored);
    markActive();
    setSidebar(false);
    window.scrollTo(0, document.body.scrollHeight);
  } catch (e) {
    setStatus(String(e.message || e), true);
    loadConversations();
  }
}

// A stored message, shown as it was when it streamed (the thinking collapsed).
function showStored(m) {
  history.push({ role: m.role, content: m.content });
  if (m.role !== "assistant") { if (m.role === "user") addMessage("user", m.content); return; }
  const view = addMessage("assistant");
  if (m.reasoning_content) {
    view.think.hidden = false;
    view.think.open = false;
    view.summary.textContent = "Thought";
    view.thinkText.textContent = m.reasoning_content.trim();
  }
  view.answer.textContent = displayAnswer(m.content, false);
  if (m.finish_reason === "length") view.meta.textContent = "stopped at max tokens";
}

function startRename(li, conv) {
  const input = document.createElement("input");
  input.type = "text";
  input.className = "conv-edit";
  input.value = conv.title;
  input.setAttribute("aria-label", "New title");
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conv.title) {
      try { await api("PATCH", "ui/conversations/" + encodeURIComponent(conv.id), { title }); }
      catch (e) { setStatus(String(e.message || e), true); }
    }
    loadConversations();
  };
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { ev.preventDefault(); finish(true); }
    if (ev.key === "Escape") { ev.preventDefault(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
  li.replaceChildren(input);
  input.focus();
  input.select();
}

async function deleteConversation(conv) {
  if (!window.confirm("Delete the conversation “" + (conv.title || "New chat") + "”?")) return;
  try {
    await api("DELETE", "ui/conversations/" + encodeURIComponent(conv.id));
    if (conv.id === currentId) newChat();
  } catch (e) {
    setStatus(String(e.message || e), true);
  }
  loadConversations();
}

// On a narrow screen the sidebar is a drawer over the page; on a wide one it is always there.
function setSidebar(open) {
  els.sidebar.classList.toggle("open", open);
  els.scrim.hidden = !open;
  els.sidebarToggle.setAttribute("aria-expanded", String(open));
}
els.sidebarToggle.addEventListener("click", () => setSidebar(!els.sidebar.classList.contains("open")));
els.sidebarClose.addEventListener("click", () => setSidebar(false));
els.scrim.addEventListener("click", () => setSidebar(false));
let searchTimer = null;
els.search.addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(loadConversations, 200); });

showSettings();
loadModel();
loadConversations();
els.prompt.focus();
