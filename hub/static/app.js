// The saia chat page: wires the hub client, the conversation store and the DOM.

import { ApiError, HubClient, describeError } from "./api.js";
import { describeModel, normalizeModels } from "./models.js";
import { conversationItem, fillMessage, messageView } from "./views.js";
import { ConversationStore, settings } from "./store.js";

const MODEL_REFRESH_MS = 30000;
const $ = (id) => document.getElementById(id);

const ui = {
  layout: $("layout"),
  sidebar: $("sidebar"),
  conversationList: $("conversation-list"),
  newChat: $("new-chat"),
  identity: $("identity"),
  logout: $("logout"),
  toggleSidebar: $("toggle-sidebar"),
  modelSelect: $("model-select"),
  modelState: $("model-state"),
  banner: $("error-banner"),
  bannerText: $("error-text"),
  bannerClose: $("error-close"),
  messages: $("messages"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  loginDialog: $("login-dialog"),
  loginForm: $("login-form"),
  apiKey: $("api-key"),
  loginError: $("login-error"),
  template: $("message-template"),
};

const state = {
  client: null,
  models: [],
  store: new ConversationStore(),
  abort: null, // AbortController of the answer being streamed
};

// ---- errors and login -------------------------------------------------------------

function showError(text) {
  ui.bannerText.textContent = text;
  ui.banner.hidden = false;
}

function clearError() {
  ui.banner.hidden = true;
  ui.bannerText.textContent = "";
}

function showLogin(message = "") {
  ui.loginError.textContent = message;
  if (!ui.loginDialog.open) ui.loginDialog.showModal();
  ui.apiKey.focus();
}

function setIdentity(apiKey) {
  ui.identity.textContent = apiKey
    ? `Key ${apiKey.slice(0, 12)}…`
    : "Signed in through your organisation";
  ui.logout.hidden = !apiKey;
}

async function tryClient(client) {
  const payload = await client.listModels();
  state.client = client;
  setIdentity(client.apiKey);
  setModels(payload);
}

// Single sign-on first (the proxy adds the identity), then a saved key, then ask.
async function connect() {
  try {
    await tryClient(new HubClient(null));
    return;
  } catch (error) {
    if (!(error instanceof ApiError) || error.kind !== "auth") {
      modelsUnavailable(error);
      return;
    }
  }
  const saved = settings.apiKey();
  if (!saved) return showLogin();
  try {
    await tryClient(new HubClient(saved));
  } catch (error) {
    if (error.kind !== "auth") return modelsUnavailable(error);
    settings.setApiKey(null);
    showLogin("The saved API key is no longer accepted. Paste a valid key.");
  }
}

async function login(event) {
  event.preventDefault();
  const key = ui.apiKey.value.trim();
  if (!key) return;
  ui.loginError.textContent = "Checking the key…";
  try {
    await tryClient(new HubClient(key));
  } catch (error) {
    ui.loginError.textContent =
      error.kind === "auth" ? "This API key was not accepted (401)." : describeError(error);
    return;
  }
  if (!settings.setApiKey(key)) {
    showError("This browser refused to save the key; log in again next time.");
  }
  ui.apiKey.value = "";
  ui.loginError.textContent = "";
  ui.loginDialog.close();
  clearError();
  ui.prompt.focus();
}

function logout() {
  state.abort?.abort();
  settings.setApiKey(null);
  state.client = null;
  state.models = [];
  fillModelSelect();
  setIdentity(null);
  ui.identity.textContent = "";
  showLogin();
}

// ---- models -----------------------------------------------------------------------

function modelsUnavailable(error) {
  state.models = [];
  fillModelSelect("Models unavailable");
  showError(describeError(error));
}

function setModels(payload) {
  state.models = normalizeModels(payload);
  fillModelSelect(state.models.length ? "" : "No models available to you");
}

function preferredModel() {
  const ids = new Set(state.models.map((model) => model.id));
  const wanted = [ui.modelSelect.value, state.store.active()?.model, settings.model()];
  const ready = state.models.find((model) => model.status === "ready");
  return wanted.find((id) => id && ids.has(id)) || ready?.id || state.models[0]?.id || "";
}

function fillModelSelect(emptyText = "") {
  const chosen = preferredModel();
  ui.modelSelect.replaceChildren();
  for (const model of state.models) {
    const details = describeModel(model);
    const label = details ? `${model.name} (${details})` : model.name;
    ui.modelSelect.append(new Option(label, model.id, false, model.id === chosen));
  }
  if (!state.models.length) ui.modelSelect.append(new Option(emptyText || "No models", ""));
  ui.modelSelect.disabled = !state.models.length;
  showModelState();
}

function selectedModel() {
  return state.models.find((model) => model.id === ui.modelSelect.value) || null;
}

function badge(text, kind) {
  const element = document.createElement("span");
  element.className = `badge ${kind}`;
  element.textContent = text;
  return element;
}

function showModelState() {
  const model = selectedModel();
  ui.modelState.replaceChildren();
  if (!model) return;
  if (model.status) ui.modelState.append(badge(model.status, `status-${model.status}`));
  if (model.demand) ui.modelState.append(badge(`demand ${model.demand}`, `demand-${model.demand}`));
}

async function refreshModels() {
  if (!state.client || state.abort || document.visibilityState !== "visible") return;
  try {
    setModels(await state.client.listModels());
  } catch (error) {
    if (error.kind === "auth") showLogin("Your session ended. Log in again.");
  }
}

// ---- conversations ----------------------------------------------------------------

function renderConversations() {
  const items = state.store.list().map((conversation) =>
    conversationItem(conversation, conversation === state.store.active(), {
      open: openConversation,
      remove: deleteConversation,
    }),
  );
  ui.conversationList.replaceChildren(...items);
}

function openConversation(id) {
  if (state.abort) return;
  state.store.select(id);
  const model = state.store.active()?.model;
  if (model && state.models.some((m) => m.id === model)) ui.modelSelect.value = model;
  showModelState();
  renderAll();
  setSidebar(false);
  ui.prompt.focus();
}

function deleteConversation(id) {
  if (state.abort && state.store.activeId === id) state.abort.abort();
  if (!state.store.remove(id)) showError("This browser refused to save the change.");
  renderAll();
}

function newChat() {
  if (state.abort) return;
  state.store.select(null);
  renderAll();
  ui.prompt.focus();
}

// ---- messages ---------------------------------------------------------------------

function renderMessages() {
  const conversation = state.store.active();
  if (!conversation || !conversation.messages.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    const text = document.createElement("p");
    text.textContent = "Pick a model and ask anything. Conversations stay in this browser.";
    empty.append(text);
    ui.messages.replaceChildren(empty);
    return;
  }
  const views = conversation.messages.map((message) => messageView(ui.template, message));
  ui.messages.replaceChildren(...views);
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderAll() {
  renderConversations();
  renderMessages();
}

// ---- sending ----------------------------------------------------------------------

function setStreaming(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  ui.newChat.disabled = on;
  ui.messages.setAttribute("aria-busy", String(on));
}

// What the model sees: earlier turns with text, never our error notes. A question whose
// answer failed empty is dropped too, so roles keep alternating as chat templates expect.
function history(conversation) {
  const kept = [];
  for (const message of conversation.messages) {
    if (message.role === "assistant" && !message.content) {
      if (kept.at(-1)?.role === "user") kept.pop();
      continue;
    }
    kept.push({ role: message.role, content: message.content });
  }
  return kept;
}

function startTurn(text, model) {
  const conversation = state.store.active() || (state.store.create(model.id), state.store.active());
  conversation.model = model.id;
  conversation.messages.push({ role: "user", content: text });
  const messages = history(conversation);
  const answer = { role: "assistant", content: "", model: model.name, pending: true };
  conversation.messages.push(answer);
  state.store.touch(conversation);
  settings.setModel(model.id);
  renderAll();
  return { conversation, messages, answer, view: ui.messages.lastElementChild };
}

async function send(event) {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  const model = selectedModel();
  if (!text || state.abort) return;
  if (!state.client) return showLogin();
  if (!model) return showError("Pick a model first.");
  clearError();
  ui.prompt.value = "";
  resizePrompt();
  const turn = startTurn(text, model);
  state.abort = new AbortController();
  setStreaming(true);
  try {
    await streamAnswer(turn, model, state.abort.signal);
  } finally {
    state.abort = null;
    turn.answer.pending = false;
    fillMessage(turn.view, turn.answer);
    if (!state.store.touch(turn.conversation)) showError("This browser refused to save the chat.");
    setStreaming(false);
    ui.prompt.focus();
  }
}

async function streamAnswer(turn, model, signal) {
  const { answer, view } = turn;
  const draw = frameThrottle(() => fillMessage(view, answer));
  try {
    for await (const event of state.client.streamChat(model.id, turn.messages, signal)) {
      answer.content += event.content || "";
      answer.reasoning = (answer.reasoning || "") + (event.reasoning || "");
      if (event.usage) answer.usage = event.usage;
      if (event.finish) answer.finish = event.finish;
      draw();
      stickToBottom();
    }
  } catch (error) {
    if (signal.aborted) {
      answer.stopped = true;
      return;
    }
    answer.error = error instanceof ApiError ? describeError(error, model.name) : String(error);
    showError(answer.error);
    if (error.kind === "auth") showLogin("Your API key was not accepted (401). Log in again.");
  }
}

// Markdown is re-rendered at most once per animation frame, however fast tokens come.
function frameThrottle(fn) {
  let scheduled = false;
  return () => {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      fn();
    });
  };
}

function stickToBottom() {
  const { scrollTop, scrollHeight, clientHeight } = ui.messages;
  if (scrollHeight - scrollTop - clientHeight < 120) ui.messages.scrollTop = scrollHeight;
}

function resizePrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}

function onPromptKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
}

// ---- start ------------------------------------------------------------------------

function setSidebar(open) {
  ui.layout.classList.toggle("sidebar-open", open);
  ui.toggleSidebar.setAttribute("aria-expanded", String(open));
}

function bind() {
  ui.composer.addEventListener("submit", send);
  ui.prompt.addEventListener("keydown", onPromptKey);
  ui.prompt.addEventListener("input", resizePrompt);
  ui.stop.addEventListener("click", () => state.abort?.abort());
  ui.newChat.addEventListener("click", newChat);
  ui.logout.addEventListener("click", logout);
  ui.loginForm.addEventListener("submit", login);
  ui.loginDialog.addEventListener("cancel", (event) => event.preventDefault());
  ui.bannerClose.addEventListener("click", clearError);
  ui.modelSelect.addEventListener("change", () => {
    settings.setModel(ui.modelSelect.value);
    showModelState();
  });
  ui.toggleSidebar.addEventListener("click", (event) => {
    event.stopPropagation();
    setSidebar(!ui.layout.classList.contains("sidebar-open"));
  });
  // On small screens the sidebar overlays the chat: a click beside it or Escape closes it.
  ui.layout.addEventListener("click", (event) => {
    if (!event.composedPath().includes(ui.sidebar)) setSidebar(false);
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") setSidebar(false);
  });
  setInterval(refreshModels, MODEL_REFRESH_MS);
}

bind();
renderAll();
connect();
