// salmonn's web page: a client of the server's OpenAI-compatible API, like any other.
// What it needs to know comes from /ui/config.json (the model, the key, the defaults, each button's task);
// answers stream as server-sent events; every error shown is the API's own one sentence.
"use strict";

const KEY_STORAGE = "salmonn.api_key";
const API = {
  transcription: "/v1/audio/transcriptions",
  translation: "/v1/audio/translations",
  chat: "/v1/chat/completions",
};
// The time label of a long answer's line, as `salmonn ask` prints it: "[mm:ss–mm:ss] text" (h:mm:ss past an hour).
const TIMED_LINE = /^\[((?:\d+:)?\d{2}:\d{2})–((?:\d+:)?\d{2}:\d{2})\] ?(.*)$/;

const $ = (id) => document.getElementById(id);
const state = { config: null, clip: null, busy: null, loraTouched: false, lastAction: null };

// -- the API ------------------------------------------------------------------------------------------------------
class ApiFailure extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function failureOf(response) {
  let message = `the server answered HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: the status says it */ }
  return new ApiFailure(message, response.status);
}

async function post(path, body, signal, headers = {}) {
  let response;
  try {
    response = await fetch(path, { method: "POST", body, signal, headers: { ...headers, ...authHeaders() } });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiFailure(`could not reach the server (${error.message})`, 0);
  }
  if (!response.ok) throw await failureOf(response);
  return response;
}

// Each `data:` payload of a server-sent event stream, parsed, as it arrives.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data || data === "[DONE]") continue;
      const event = JSON.parse(data);
      if (event.error) throw new ApiFailure(event.error.message, 0);
      yield event;
    }
  }
}

// -- times --------------------------------------------------------------------------------------------------------
function clock(seconds) {
  const total = Math.max(0, Math.round(seconds));
  const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
  const mm = String(m).padStart(2, "0"), ss = String(s).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

function secondsOf(label) {
  return label.split(":").reduce((total, part) => total * 60 + Number(part), 0);
}

function seekTo(seconds) {
  const player = $("player");
  player.currentTime = seconds;
  player.play().catch(() => {}); // a browser may refuse to play without a gesture; the seek stands
}

// -- answers ------------------------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

// One request and its answer on the page, in one of three layouts: "text" as it streams; "segments", a long
// transcription's timed lines from its segment events; "labels", a long chat answer's lines, each with its label.
class Turn {
  constructor(title, layout) {
    this.layout = layout;
    this.text = "";
    this.answer = el("div", { class: "answer" });
    this.segments = el("ol", { class: "segments" });
    this.segments.hidden = true;
    this.root = el("article", { class: "turn", "data-state": "streaming", "data-layout": layout },
                   el("h2", {}, title), this.segments, this.answer);
    $("turns").prepend(this.root);
  }

  delta(text) {
    this.text += text;
    if (this.layout === "labels") this.showLabelled(false);
    else this.answer.append(text); // a text node per delta: the answer grows as the model speaks
  }

  segment(start, end, text) { // its text leaves the running answer for a timed line
    if (this.layout !== "segments") return;
    this.segments.hidden = false;
    this.segments.append(this.line(start, end, text));
    this.answer.replaceChildren();
    this.answer.classList.add("pending");
  }

  showLabelled(final) { // the last line is still being written until the answer is done
    const lines = this.text.split("\n");
    const rest = final ? "" : lines.pop();
    this.segments.replaceChildren(...lines.filter((line) => line.trim()).map((line) => {
      const match = TIMED_LINE.exec(line);
      return match ? this.line(secondsOf(match[1]), secondsOf(match[2]), match[3]) : el("li", {}, line);
    }));
    this.segments.hidden = !this.segments.childElementCount;
    this.answer.replaceChildren(rest);
  }

  line(start, end, text) {
    const time = el("button", { type: "button", class: "time", "data-start": String(start) },
                    `${clock(start)}–${clock(end)}`);
    time.addEventListener("click", () => seekTo(start));
    return el("li", {}, time, el("span", { class: "text" }, text));
  }

  done(text) {
    if (text !== undefined && text !== this.text) { // what the server settled on is the answer
      this.text = text;
      if (this.layout !== "segments") this.answer.replaceChildren(text);
    }
    if (this.layout === "labels") this.showLabelled(true);
    if (this.layout === "segments" && this.segments.childElementCount) this.answer.replaceChildren();
    this.answer.classList.remove("pending");
    if (!this.text.trim()) this.answer.replaceChildren(el("span", { class: "empty" }, "(the model said nothing)"));
    this.root.dataset.state = "done";
  }

  fail(message) { // what was said before a stop or a failure stays, with the reason under it
    if (this.layout === "labels") this.showLabelled(true);
    this.answer.classList.remove("pending");
    this.root.append(el("p", { class: "error", role: "alert" }, message));
    this.root.dataset.state = "error";
  }
}

// -- running an action --------------------------------------------------------------------------------------------
function decodeFields(action) { // an untouched slider sends the task's own scale exactly, not the slider's step
  const fields = { lora_scale: state.loraTouched ? Number($("lora").value) : action.lora_scale };
  const beams = $("beams").value, tokens = $("max-tokens").value;
  if (beams) fields.num_beams = Number(beams);
  if (tokens) fields.max_tokens = Number(tokens);
  return fields;
}

async function transcribe(action, extra, turn, signal) {
  const form = new FormData();
  form.append("file", state.clip.file, state.clip.name);
  form.append("model", state.config.model);
  form.append("stream", "true");
  form.append("timestamp_granularities[]", "segment");
  const { max_tokens, ...fields } = decodeFields(action);
  if (max_tokens) form.append("max_new_tokens", String(max_tokens));
  for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
  if (extra.language) form.append("to_language", extra.language);
  const response = await post(API[action.api], form, signal);
  for await (const event of events(response)) {
    if (event.type === "transcript.text.delta") turn.delta(event.delta);
    else if (event.type === "transcript.text.segment") turn.segment(event.start, event.end, event.text);
    else if (event.type === "transcript.text.done") turn.done(event.text);
  }
}

async function chat(action, extra, turn, signal) {
  const instruction = action.instruction || extra.question;
  const audio = { type: "input_audio", input_audio: { data: await clipBase64(), format: state.clip.format } };
  const body = JSON.stringify({
    model: state.config.model,
    messages: [{ role: "user", content: [{ type: "text", text: instruction }, audio] }],
    stream: true,
    ...decodeFields(action),
  });
  const response = await post(API.chat, body, signal, { "Content-Type": "application/json" });
  for await (const event of events(response)) {
    const choice = event.choices && event.choices[0];
    if (choice && choice.delta && choice.delta.content) turn.delta(choice.delta.content);
  }
  turn.done();
}

async function run(action, extra, title) {
  if (state.busy || !state.clip) return;
  const long = state.clip.seconds > state.config.window_seconds;
  const turn = new Turn(title, !long ? "text" : action.api === "chat" ? "labels" : "segments");
  const controller = new AbortController();
  setBusy(controller);
  try {
    await (action.api === "chat" ? chat : transcribe)(action, extra, turn, controller.signal);
    if (turn.root.dataset.state === "streaming") turn.done();
  } catch (error) {
    if (error.name === "AbortError") turn.fail("stopped");
    else if (error instanceof ApiFailure) {
      turn.fail(error.message);
      if (error.status === 401) askForKey(error.message);
    } else turn.fail(`the answer could not be read (${error.message})`);
  } finally {
    setBusy(null);
  }
}

function setBusy(controller) {
  state.busy = controller;
  for (const button of $("actions").querySelectorAll("button")) button.disabled = Boolean(controller);
  $("busy").hidden = !controller;
  $("new-clip").disabled = Boolean(controller);
}

// -- the clip -----------------------------------------------------------------------------------------------------
function useClip(file, name, recordedSeconds) {
  if (state.clip) URL.revokeObjectURL(state.clip.url);
  const url = URL.createObjectURL(file);
  const format = (name.split(".").pop() || "wav").toLowerCase();
  state.clip = { file, name, url, format, seconds: recordedSeconds || 0, base64: null };
  const player = $("player");
  player.src = url;
  player.onloadedmetadata = () => {
    if (Number.isFinite(player.duration)) state.clip.seconds = player.duration;
  };
  $("clip-name").textContent = name;
  $("picker").hidden = true;
  $("clip").hidden = $("controls").hidden = false;
}

function newClip() {
  if (state.busy) return;
  if (state.clip) URL.revokeObjectURL(state.clip.url);
  state.clip = null;
  $("player").removeAttribute("src");
  $("player").load();
  $("file").value = "";
  $("turns").replaceChildren();
  $("clip").hidden = $("controls").hidden = true;
  $("picker").hidden = false;
}

function clipBase64() { // once per clip: a follow-up question sends the same bytes, which the server has cached
  if (state.clip.base64) return Promise.resolve(state.clip.base64);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve((state.clip.base64 = reader.result.slice(reader.result.indexOf(",") + 1)));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(state.clip.file);
  });
}

function setUpPicker() {
  const drop = $("drop");
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) useClip(file, file.name);
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) useClip(file, file.name);
  });
  $("record").addEventListener("click", toggleRecording);
  $("new-clip").addEventListener("click", newClip);
}

const recording = { recorder: null, started: 0, timer: 0 };

async function toggleRecording() {
  const button = $("record"), note = $("record-note");
  if (recording.recorder) {
    recording.recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    note.textContent = "recording needs a secure page: open it as http://localhost:PORT or over https";
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    note.textContent = `no microphone: ${error.message}`;
    return;
  }
  const type = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", ""].find((t) => !t || MediaRecorder.isTypeSupported(t));
  const recorder = new MediaRecorder(stream, type ? { mimeType: type } : {});
  const chunks = [];
  recorder.ondataavailable = (event) => event.data.size && chunks.push(event.data);
  recorder.onstop = () => {
    clearInterval(recording.timer);
    stream.getTracks().forEach((track) => track.stop());
    const seconds = (performance.now() - recording.started) / 1000;
    recording.recorder = null;
    button.textContent = "Record";
    button.classList.remove("recording");
    note.textContent = "";
    const blob = new Blob(chunks, { type: recorder.mimeType });
    const suffix = recorder.mimeType.includes("ogg") ? "ogg" : "webm";
    useClip(new File([blob], `recording.${suffix}`, { type: blob.type }), `recording.${suffix}`, seconds);
  };
  recording.recorder = recorder;
  recording.started = performance.now();
  recorder.start();
  button.classList.add("recording");
  const tick = () => {
    const seconds = (performance.now() - recording.started) / 1000;
    button.textContent = `Stop ${clock(seconds)}`;
    button.dataset.seconds = seconds.toFixed(1);
  };
  tick();
  recording.timer = setInterval(tick, 250);
}

// -- controls -----------------------------------------------------------------------------------------------------
function setLora(value) {
  $("lora").value = String(value);
  $("lora-value").textContent = Number(value).toFixed(1);
}

function chooseAction(action) { // the slider follows the task's own scale until the user moves it
  state.lastAction = action;
  if (!state.loraTouched) setLora(action.lora_scale);
}

function buildActions() {
  const plain = el("div", { class: "row" });
  const box = $("actions");
  box.replaceChildren(plain);
  for (const action of state.config.actions) {
    const button = el("button", { type: "button", "data-action": action.name }, action.label);
    if (!action.asks) {
      button.addEventListener("click", () => { chooseAction(action); run(action, {}, action.label); });
      plain.append(button);
      continue;
    }
    const input = el("input", {
      type: "text", id: `${action.name}-input`, "aria-label": action.asks,
      placeholder: action.asks === "language" ? "into which language? (German, fr, …)" : "Ask about the clip…",
    });
    if (action.asks === "language") input.value = "English";
    const go = () => {
      const value = input.value.trim();
      if (!value) { input.focus(); return; }
      chooseAction(action);
      const title = action.asks === "language" ? `${action.label} into ${value}` : value;
      run(action, { [action.asks]: value }, title);
      if (action.asks === "question") input.value = "";
    };
    button.addEventListener("click", go);
    input.addEventListener("keydown", (event) => { if (event.key === "Enter") go(); });
    box.append(el("div", { class: "row" }, input, button));
  }
}

function setUpControls() {
  const { defaults, lora } = state.config;
  $("lora").max = String(lora.max);
  setLora(state.config.actions[0].lora_scale);
  $("lora").addEventListener("input", () => { state.loraTouched = true; setLora($("lora").value); });
  $("lora-reset").addEventListener("click", () => {
    state.loraTouched = false;
    setLora((state.lastAction || state.config.actions[0]).lora_scale);
  });
  $("beams").value = defaults.num_beams;
  $("max-tokens").value = defaults.max_tokens;
  $("stop").addEventListener("click", () => state.busy && state.busy.abort());
  buildActions();
}

// -- the key ------------------------------------------------------------------------------------------------------
function askForKey(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  $("key-form").hidden = false;
  $("key-error").hidden = !message;
  $("key-error").textContent = message || "";
  $("key").focus();
}

function setUpKey() {
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    const check = await fetch("/v1/models", { headers: { Authorization: `Bearer ${key}` } });
    if (!check.ok) {
      askForKey((await failureOf(check)).message);
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key").value = "";
    $("key-form").hidden = true;
    $("picker").hidden = Boolean(state.clip);
  });
}

async function start() {
  try {
    const response = await fetch("/ui/config.json");
    if (!response.ok) throw await failureOf(response);
    state.config = await response.json();
  } catch (error) {
    $("page-error").textContent = `the server's settings could not be read: ${error.message}`;
    $("page-error").hidden = false;
    return;
  }
  $("model").textContent = state.config.model;
  setUpKey();
  setUpControls();
  setUpPicker();
  if (state.config.needs_key && !sessionStorage.getItem(KEY_STORAGE)) askForKey();
  else $("picker").hidden = false;
  document.body.dataset.ready = "true";
}

start();
