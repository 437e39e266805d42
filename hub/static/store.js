// Conversations and the API key, kept in this browser's localStorage only.
// The hub stores no prompt or answer text; deleting here deletes everywhere.

const CONVERSATIONS = "saia.conversations";
const ACTIVE = "saia.active";
const API_KEY = "saia.apiKey";
const MODEL = "saia.model";
const TITLE_LENGTH = 60;

function read(key, fallback) {
  try {
    const value = localStorage.getItem(key);
    return value === null ? fallback : JSON.parse(value);
  } catch {
    return fallback; // unreadable or corrupt: start clean rather than break the page
  }
}

// Returns false when the browser refuses (quota, private mode), so the page can say so.
function write(key, value) {
  try {
    if (value === null) localStorage.removeItem(key);
    else localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
}

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
}

// The first line of the first question, without Markdown emphasis marks.
export function titleOf(text) {
  const line = text.trim().split("\n")[0].replace(/[*_`#>~]+/g, "").trim();
  return line.length > TITLE_LENGTH ? `${line.slice(0, TITLE_LENGTH - 1)}…` : line || "New chat";
}

export class ConversationStore {
  constructor() {
    const stored = read(CONVERSATIONS, []);
    this.conversations = Array.isArray(stored) ? stored.filter(isConversation) : [];
    this.activeId = read(ACTIVE, null);
    // An answer still streaming when the page closed was cut off there.
    for (const conversation of this.conversations) {
      for (const message of conversation.messages) {
        if (message.pending) Object.assign(message, { pending: false, stopped: true });
      }
    }
  }

  list() {
    return [...this.conversations].sort((a, b) => b.updated - a.updated);
  }

  get(id) {
    return this.conversations.find((conversation) => conversation.id === id) || null;
  }

  active() {
    return this.get(this.activeId);
  }

  create(model) {
    const conversation = {
      id: newId(),
      title: "New chat",
      model,
      messages: [],
      updated: Date.now(),
    };
    this.conversations.push(conversation);
    this.activeId = conversation.id;
    return this.save();
  }

  select(id) {
    this.activeId = this.get(id) ? id : null;
    return write(ACTIVE, this.activeId);
  }

  remove(id) {
    this.conversations = this.conversations.filter((conversation) => conversation.id !== id);
    if (this.activeId === id) this.activeId = null;
    return this.save();
  }

  touch(conversation) {
    conversation.updated = Date.now();
    const first = conversation.messages.find((message) => message.role === "user");
    if (first) conversation.title = titleOf(first.content);
    return this.save();
  }

  save() {
    return write(CONVERSATIONS, this.conversations) && write(ACTIVE, this.activeId);
  }
}

function isConversation(value) {
  return value && typeof value.id === "string" && Array.isArray(value.messages);
}

export const settings = {
  apiKey: () => read(API_KEY, null),
  setApiKey: (key) => write(API_KEY, key),
  model: () => read(MODEL, null),
  setModel: (id) => write(MODEL, id),
};
