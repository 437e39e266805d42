// Chat messages and conversation entries as DOM. A message has its role, a body (plain
// text for the user, sanitised Markdown for the model), an error note and a meta line.
// No app state here: the caller owns the lists and passes callbacks.

import { renderMarkdown, renderPlain } from "./markdown.js";

function usageText(usage) {
  if (!usage) return "";
  return `${usage.prompt_tokens ?? "?"} prompt + ${usage.completion_tokens ?? "?"} answer tokens`;
}

function metaText(message) {
  const parts = [];
  if (message.model) parts.push(message.model);
  if (message.usage) parts.push(usageText(message.usage));
  if (message.finish === "length") parts.push("cut off at the token limit");
  if (message.stopped) parts.push("stopped");
  return parts.join(" · ");
}

export function messageView(template, message) {
  const view = template.content.firstElementChild.cloneNode(true);
  view.classList.add(message.role);
  view.querySelector(".message-role").textContent = message.role === "user" ? "You" : "Assistant";
  fillMessage(view, message);
  return view;
}

export function fillMessage(view, message) {
  const body = view.querySelector(".message-body");
  if (message.role === "user") renderPlain(body, message.content);
  else renderMarkdown(body, message.content);
  if (message.reasoning) body.prepend(reasoningView(message.reasoning));
  if (message.error) {
    const error = document.createElement("p");
    error.className = "message-error";
    error.textContent = message.error;
    body.append(error);
  }
  view.querySelector(".message-meta").textContent = metaText(message);
  view.classList.toggle("pending", Boolean(message.pending));
}

function reasoningView(text) {
  const details = document.createElement("details");
  details.className = "reasoning";
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const body = document.createElement("p");
  body.textContent = text;
  details.append(summary, body);
  return details;
}

// One entry of the conversation list: open it, or delete it.
export function conversationItem(conversation, active, { open, remove }) {
  const item = document.createElement("li");
  const openButton = document.createElement("button");
  openButton.type = "button";
  openButton.className = "conversation";
  openButton.textContent = conversation.title;
  if (active) openButton.setAttribute("aria-current", "true");
  openButton.addEventListener("click", () => open(conversation.id));
  const removeButton = document.createElement("button");
  removeButton.type = "button";
  removeButton.className = "delete";
  removeButton.textContent = "×";
  removeButton.setAttribute("aria-label", `Delete conversation: ${conversation.title}`);
  removeButton.addEventListener("click", () => remove(conversation.id));
  item.append(openButton, removeButton);
  return item;
}
