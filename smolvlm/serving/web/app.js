// The chat page: a client of this server's own OpenAI-compatible API (POST /v1/chat/completions with stream: true),
// plus "what the model sees" for attachments: image tiles computed with the processor's arithmetic from
// GET /v1/smolvlm/processor, video frames sampled by POST /v1/smolvlm/video-frames.
"use strict";

const KEY_STORAGE = "smolvlm.apiKey";
const $ = (id) => document.getElementById(id);
const state = {
  messages: [],     // {role: "user", text, media, failed} | {role: "assistant", text, stats, note} | {role: "error", text}
  pending: [],      // attachments for the next message: {kind: "image"|"video", url, name, width, height, frames}
  settings: null,   // GET /v1/smolvlm/processor
  controller: null, // the AbortController of the answer being streamed
  streaming: null,  // the assistant message being streamed
};

// -- the API key: asked for once (on a 401), kept in localStorage --

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? {Authorization: `Bearer ${key}`} : {};
}

function askKey(reason) {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-reason").textContent = reason || "This server needs an API key.";
    $("key-input").value = localStorage.getItem(KEY_STORAGE) || "";
    dialog.addEventListener("close", () => {
      const saved = dialog.returnValue === "save" && $("key-input").value.trim();
      if (saved) localStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
      resolve(Boolean(saved));
    }, {once: true});
    dialog.showModal();
  });
}

// fetch() with the key; on a 401 asks for a key and tries again (once per key entered).
async function apiFetch(path, options = {}) {
  for (;;) {
    const response = await fetch(path, {...options, headers: {...options.headers, ...authHeaders()}});
    if (response.status !== 401) return response;
    if (!(await askKey(await errorMessage(response)))) return response;
  }
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error.message;
  } catch {
    return `HTTP ${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
  }
}

// -- what the model sees: the image processor's tiling (smolvlm/processing/image_processor.py, same float64
// arithmetic and int() truncation) --

function resizedSize(width, height, s) {
  if (!("longest_edge" in s.size)) return [s.size.width, s.size.height];
  const longest = s.size.longest_edge;
  let ratio = width / height;
  if (width >= height) {
    width = longest; height = Math.trunc(longest / ratio); height += height % 2;
  } else {
    width = Math.trunc(longest * ratio); height = longest; width += width % 2;
  }
  width = Math.max(width, 1); height = Math.max(height, 1);
  ratio = width / height;
  const cap = s.max_resize;
  if (width >= height && width > cap) {
    width = cap; height = Math.trunc(cap / ratio);
  } else if (height > width && height > cap) {
    width = Math.trunc(cap * ratio); height = cap;
  }
  return [Math.max(width, 1), Math.max(height, 1)];
}

function gridSize(width, height, m) {
  const ratio = width / height;
  if (width >= height) {
    width = Math.ceil(width / m) * m;
    height = Math.ceil(Math.trunc(width / ratio) / m) * m;
  } else {
    height = Math.ceil(height / m) * m;
    width = Math.ceil(Math.trunc(height * ratio) / m) * m;
  }
  return [width, height];
}

// {frames, rows, cols, tokens} for an image of width x height (rows = cols = 0: one unsplit frame).
function tiling(width, height, s, split) {
  const m = s.max_image_size;
  let rows = 0, cols = 0;
  if (s.do_resize) [width, height] = resizedSize(width, height, s);
  if (split) {
    const [gw, gh] = gridSize(width, height, m);
    if (gw > m || gh > m) [rows, cols] = [gh / m, gw / m];
  }
  const frames = rows ? rows * cols + 1 : 1;
  return {frames, rows, cols, tokens: frames * s.image_seq_len};
}

const splitting = () => $("splitting").checked;

function formatTime(seconds) {
  const s = Math.floor(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

// The tile grid over the image, then the global (whole-image) frame the processor appends.
function drawTiles(image, plan) {
  const canvas = document.createElement("canvas");
  const h = 64, w = Math.max(16, Math.round(h * image.naturalWidth / image.naturalHeight));
  canvas.width = w + (plan.rows ? h + 8 : 0);
  canvas.height = h;
  const g = canvas.getContext("2d");
  g.drawImage(image, 0, 0, w, h);
  g.strokeStyle = "#ff3b30";
  g.lineWidth = 1.5;
  if (plan.rows) {
    for (let r = 0; r <= plan.rows; r++) { g.beginPath(); g.moveTo(0, r * h / plan.rows); g.lineTo(w, r * h / plan.rows); g.stroke(); }
    for (let c = 0; c <= plan.cols; c++) { g.beginPath(); g.moveTo(c * w / plan.cols, 0); g.lineTo(c * w / plan.cols, h); g.stroke(); }
    g.drawImage(image, w + 8, 0, h, h);  // the global image, squeezed to one tile
    g.strokeRect(w + 8, 0, h, h);
  } else {
    g.strokeRect(0, 0, w, h);
  }
  canvas.setAttribute("aria-hidden", "true");
  return canvas;
}

function seesImage(item) {
  const box = document.createElement("div");
  box.className = "sees";
  if (!state.settings) return box;
  const plan = tiling(item.width, item.height, state.settings, splitting());
  Object.assign(box.dataset, {frames: plan.frames, rows: plan.rows, cols: plan.cols, tokens: plan.tokens});
  const grid = plan.rows ? `${plan.cols}×${plan.rows} tiles + 1 global image` : "1 tile (not split)";
  box.textContent = `${item.width}×${item.height} px → ${grid} = ${plan.frames} frame${plan.frames > 1 ? "s" : ""}, ` +
                    `${plan.tokens} image tokens`;
  if (item.image) box.append(drawTiles(item.image, plan));
  return box;
}

function seesVideo(item) {
  const box = document.createElement("div");
  box.className = "sees";
  if (item.error) {
    box.textContent = item.error;
    box.classList.add("error");
  } else if (!item.frames) {
    box.textContent = "sampling frames…";
  } else {
    const f = item.frames;
    box.dataset.frames = f.frames.length;
    box.dataset.tokens = f.image_tokens;
    box.textContent = `${f.duration.toFixed(1)} s at ${f.fps.toFixed(2)} fps → ${f.frames.length} frames, ` +
                      `${f.image_tokens} image tokens`;
    const strip = document.createElement("div");
    strip.className = "frames";
    for (const frame of f.frames) {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = frame.thumbnail;
      img.alt = `frame ${frame.index}`;
      const caption = document.createElement("figcaption");
      caption.textContent = formatTime(frame.time);
      caption.title = `${frame.time.toFixed(2)} s (frame ${frame.index})`;
      figure.append(img, caption);
      strip.append(figure);
    }
    box.append(strip);
  }
  return box;
}

// -- attachments --

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser can't decode this image"));
    image.src = url;
  });
}

async function attach(files) {
  for (const file of files) {
    const kind = file.type.startsWith("video/") ? "video" : file.type.startsWith("image/") ? "image" : null;
    if (!kind) {
      showError(`${file.name}: not an image or a video (${file.type || "unknown type"})`);
      continue;
    }
    if (kind === "video" && state.settings && !state.settings.video) {
      showError(`${file.name}: this server's model (SmolVLM v1) takes no videos`);
      continue;
    }
    const item = {kind, name: file.name, url: await readDataURL(file)};
    if (kind === "image") {
      try {
        item.image = await loadImage(item.url);  // its natural size has the EXIF orientation applied, as the server's
        item.width = item.image.naturalWidth;
        item.height = item.image.naturalHeight;
      } catch (e) {
        showError(`${file.name}: ${e.message}`);
        continue;
      }
    }
    state.pending.push(item);
    if (kind === "video") sampleVideo(item, file);
  }
  renderAttachments();
}

async function sampleVideo(item, file) {
  try {
    const response = await apiFetch("/v1/smolvlm/video-frames", {method: "POST", body: file});
    if (response.ok) item.frames = await response.json();
    else item.error = await errorMessage(response);
  } catch (e) {
    item.error = `Can't reach the server: ${e.message}`;
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.pending.forEach((item, i) => {
    const card = document.createElement("div");
    card.className = "attachment";
    card.dataset.kind = item.kind;
    const thumb = document.createElement(item.kind === "image" ? "img" : "video");
    thumb.className = "thumb";
    thumb.src = item.url;
    if (item.kind === "image") thumb.alt = item.name; else thumb.muted = true;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${item.name}`);
    remove.onclick = () => { state.pending.splice(i, 1); renderAttachments(); $("prompt").focus(); };
    card.append(thumb, remove, item.kind === "image" ? seesImage(item) : seesVideo(item));
    box.append(card);
  });
}

// -- the conversation --

function apiMessages() {
  const detail = splitting() ? "high" : "low";
  const out = [];
  for (const m of state.messages) {
    if (m.role === "user" && !m.failed) {
      const parts = m.media.map((item) => item.kind === "image"
        ? {type: "image_url", image_url: {url: item.url, detail}}
        : {type: "video_url", video_url: {url: item.url}});
      out.push({role: "user", content: parts.length ? [...parts, {type: "text", text: m.text}] : m.text});
    } else if (m.role === "assistant" && m.text) {
      out.push({role: "assistant", content: m.text});
    }
  }
  return out;
}

function messageElement(m, last) {
  const el = document.createElement("div");
  el.className = `msg ${m.role}`;
  if (m.failed) el.classList.add("failed");
  if (m.role === "user") {
    if (m.media.length) {
      const media = document.createElement("div");
      media.className = "media";
      for (const item of m.media) {
        const thumb = document.createElement(item.kind === "image" ? "img" : "video");
        thumb.src = item.url;
        if (item.kind === "image") thumb.alt = item.name; else thumb.controls = true;
        media.append(thumb);
      }
      el.append(media);
    }
    el.append(document.createTextNode(m.text));
  } else if (m.role === "error") {
    el.setAttribute("role", "alert");
    el.textContent = m.text;
    if (last && state.messages.some((u) => u.role === "user")) el.append(metaElement(m, last));
  } else {
    const content = document.createElement("div");
    content.className = "content";
    content.innerHTML = renderMarkdown(m.text);  // escapes the text first (markdown.js)
    el.append(content);
    if (m === state.streaming) el.classList.add("streaming");
    else el.append(metaElement(m, last));
  }
  return el;
}

function metaElement(m, last) {
  const meta = document.createElement("div");
  meta.className = "meta";
  const s = m.stats || {};
  const facts = [];
  if (s.promptTokens != null) facts.push(`${s.promptTokens} prompt tokens`);
  if (s.ttft != null) facts.push(`first token ${(s.ttft / 1000).toFixed(2)} s`);
  if (s.tokens != null) facts.push(`${s.tokens} tokens`);
  if (s.tokensPerSecond != null) facts.push(`${s.tokensPerSecond.toFixed(1)} tokens/s`);
  if (m.note) facts.push(m.note);
  for (const fact of facts) {
    const span = document.createElement("span");
    span.textContent = fact;
    meta.append(span);
  }
  if (last) {
    const again = document.createElement("button");
    again.type = "button";
    again.className = "regenerate";
    again.textContent = "Regenerate";
    again.onclick = regenerate;
    meta.append(again);
  }
  return meta;
}

function render() {
  const chat = $("chat");
  const atBottom = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 40;
  const lastAnswer = state.messages.findLastIndex((m) => m.role !== "user");
  chat.replaceChildren(...state.messages.map((m, i) => messageElement(m, i === lastAnswer && !state.streaming)));
  if (!state.messages.length) chat.append(emptyNote);
  if (atBottom) chat.scrollTop = chat.scrollHeight;
  $("send").hidden = Boolean(state.streaming);
  $("stop").hidden = !state.streaming;
}

// Only the streaming answer's content changes per token: update it alone.
function renderStreaming() {
  const chat = $("chat");
  const el = chat.querySelector(".msg.streaming .content");
  if (!el) return render();
  const atBottom = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 40;
  el.innerHTML = renderMarkdown(state.streaming.text);
  if (atBottom) chat.scrollTop = chat.scrollHeight;
}

function showError(text) {
  state.messages.push({role: "error", text});
  render();
}

async function send(event) {
  if (event) event.preventDefault();
  if (state.streaming) return;
  const text = $("prompt").value.trim();
  if (!text && !state.pending.length) return;
  state.messages.push({role: "user", text, media: state.pending});
  state.pending = [];
  $("prompt").value = "";
  renderAttachments();
  await answer();
}

function regenerate() {
  if (state.streaming) return;
  while (state.messages.length && state.messages[state.messages.length - 1].role !== "user") state.messages.pop();
  if (!state.messages.length) return;
  state.messages[state.messages.length - 1].failed = false;
  answer();
}

// Streams the answer to the conversation so far; returns when it ends (finished, stopped or failed).
async function answer() {
  const turn = state.messages[state.messages.length - 1];
  const reply = {role: "assistant", text: "", stats: {}};
  const body = {messages: apiMessages(), stream: true, stream_options: {include_usage: true},
                temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value)};
  state.controller = new AbortController();
  state.streaming = reply;
  state.messages.push(reply);
  render();
  const start = performance.now();
  let first = null, chunks = 0, usage = null, failure = null, finish = null;
  try {
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      signal: state.controller.signal});
    if (!response.ok) {
      failure = await errorMessage(response);
    } else {
      for await (const data of serverSentEvents(response)) {
        if (data.error) { failure = data.error.message; break; }
        if (data.usage) usage = data.usage;
        const choice = data.choices && data.choices[0];
        if (!choice) continue;
        if (choice.finish_reason) finish = choice.finish_reason;
        if (choice.delta && choice.delta.content) {
          first ??= performance.now();
          chunks += 1;
          reply.text += choice.delta.content;
          renderStreaming();
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") reply.note = "stopped";
    else failure = `Can't reach the server: ${e.message}`;
  }
  const end = performance.now();
  const tokens = usage ? usage.completion_tokens : chunks;  // without usage (stopped): one chunk per token
  if (first != null) {
    reply.stats = {ttft: first - start, tokens, promptTokens: usage ? usage.prompt_tokens : null};
    if (tokens > 1 && end > first) reply.stats.tokensPerSecond = (tokens - 1) / ((end - first) / 1000);
  }
  if (finish === "length") reply.note = "max tokens reached";
  state.streaming = null;
  state.controller = null;
  if (failure) {
    if (!reply.text) state.messages.pop();
    if (!reply.text) turn.failed = true;  // not sent again with later turns
    state.messages.push({role: "error", text: failure});
  }
  render();
  $("prompt").focus();
}

// The JSON payloads of a text/event-stream response, until `data: [DONE]`.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.messages = [];
  state.pending = [];
  renderAttachments();
  render();
  $("prompt").focus();
}

// -- start-up and events --

const emptyNote = $("empty");

async function start() {
  fetch("/health").then((r) => r.json()).then((h) => { $("model").textContent = h.model || ""; }).catch(() => {});
  const response = await apiFetch("/v1/smolvlm/processor");
  if (!response.ok) {
    showError(`Can't read the processor settings: ${await errorMessage(response)}`);
    return;
  }
  const s = state.settings = await response.json();
  $("splitting").checked = s.do_image_splitting;
  $("max-tokens").max = s.limits.max_tokens;
  $("max-tokens").value = Math.min(512, s.limits.max_tokens);
  const size = s.size.longest_edge ? `longest edge ${s.size.longest_edge}` : `${s.size.width}×${s.size.height}`;
  $("processor").textContent = `Images: resized to ${size}, cut into ${s.max_image_size}px tiles of ` +
    `${s.image_seq_len} tokens.` + (s.video ? ` Videos: ${s.video.fps} frame/s, at most ${s.video.max_frames}.` : "");
  renderAttachments();
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.streaming) stop(); });
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
$("file").addEventListener("change", (e) => { attach([...e.target.files]); e.target.value = ""; });
$("splitting").addEventListener("change", renderAttachments);
$("temperature").addEventListener("input", (e) => { $("temperature-value").textContent = e.target.value; });
$("change-key").addEventListener("click", () => askKey("The API key this page sends with its requests:"));
$("settings-toggle").addEventListener("click", (e) => {
  const open = $("settings").classList.toggle("open");
  e.target.setAttribute("aria-expanded", String(open));
});
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (files.length) { e.preventDefault(); attach(files); }
});
let dragDepth = 0;
document.addEventListener("dragenter", (e) => { e.preventDefault(); dragDepth++; $("drop-overlay").hidden = false; });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("drop-overlay").hidden = true; } });
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  $("drop-overlay").hidden = true;
  const files = [...(e.dataTransfer ? e.dataTransfer.files : [])];
  if (files.length) attach(files);
});
start();
