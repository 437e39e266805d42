// The hub's OpenAI-compatible API as the page uses it: model list and streamed chat.
// Every failure becomes an ApiError with a kind the page can explain to a person.

import { SseParser } from "./sse.js";

export class ApiError extends Error {
  constructor(kind, message, { status = 0, retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.kind = kind; // auth | forbidden | rate | busy | loading | http | network | stream
    this.status = status;
    this.retryAfter = retryAfter; // seconds, or null
  }
}

const KINDS = { 401: "auth", 403: "forbidden", 429: "rate", 503: "loading" };
// The agent's answers when a model runs but all its slots are taken (fair queue).
const BUSY_CODES = new Set(["model_busy", "queue_full", "too_many_waiting"]);

// Retry-After is either seconds or an HTTP date.
export function parseRetryAfter(value, now = Date.now()) {
  if (!value) return null;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed);
  const date = Date.parse(trimmed);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - now) / 1000));
}

function errorCode(body) {
  const error = body && typeof body === "object" ? body.error : null;
  return error && typeof error === "object" && typeof error.code === "string" ? error.code : "";
}

function errorMessage(body) {
  const error = body && typeof body === "object" ? body.error : null;
  if (error && typeof error === "object" && typeof error.message === "string") {
    return error.message;
  }
  if (typeof error === "string") return error;
  return "";
}

export async function responseError(response) {
  let message = "";
  let code = "";
  try {
    const body = await response.json();
    message = errorMessage(body);
    code = errorCode(body);
  } catch {
    // not JSON (a proxy's HTML error page): the status says enough
  }
  const kind = BUSY_CODES.has(code) ? "busy" : KINDS[response.status] || "http";
  const retryAfter = parseRetryAfter(response.headers.get("Retry-After"));
  return new ApiError(kind, message || response.statusText || "request failed", {
    status: response.status,
    retryAfter,
  });
}

export class HubClient {
  // apiKey: null means identity comes from the reverse proxy (single sign-on).
  constructor(apiKey = null) {
    this.apiKey = apiKey;
  }

  headers(extra = {}) {
    const headers = { Accept: "application/json", ...extra };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    return headers;
  }

  async request(path, options = {}) {
    let response;
    try {
      response = await fetch(path, {
        credentials: "same-origin",
        cache: "no-store",
        ...options,
        headers: this.headers(options.headers),
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(
        "network",
        "the hub cannot be reached; check the connection or reload the page",
      );
    }
    if (!response.ok) throw await responseError(response);
    return response;
  }

  async listModels() {
    const response = await this.request("/v1/models");
    return response.json();
  }

  // Yields {content, reasoning} deltas, then {usage}, {finish}; throws ApiError.
  async *streamChat(model, messages, signal) {
    const body = JSON.stringify({
      model,
      messages,
      stream: true,
      stream_options: { include_usage: true },
    });
    const response = await this.request("/v1/chat/completions", {
      method: "POST",
      body,
      signal,
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    });
    yield* readEvents(response.body, signal);
  }
}

// Exported for the page tests; the page itself reads through HubClient.streamChat.
export async function* readEvents(stream, signal) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SseParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      const payloads = done ? parser.finish() : parser.push(value);
      for (const payload of payloads) {
        if (payload.trim() === "[DONE]") return;
        yield* chunkEvents(payload);
      }
      // OpenAI-style streams always end with [DONE]; without it the answer was cut off.
      if (done) {
        throw new ApiError("stream", "the connection closed before the answer was complete");
      }
    }
  } catch (error) {
    if (error instanceof ApiError || signal?.aborted) throw error;
    throw new ApiError("network", "the connection to the hub was lost during the answer");
  } finally {
    reader.cancel().catch(() => {});
  }
}

function* chunkEvents(payload) {
  let chunk;
  try {
    chunk = JSON.parse(payload);
  } catch {
    throw new ApiError("stream", "the hub sent a malformed stream chunk");
  }
  if (chunk.object === "error" || chunk.error) {
    throw new ApiError("stream", errorMessage(chunk) || "the model failed during the answer");
  }
  const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
  const delta = choice?.delta || {};
  const content = typeof delta.content === "string" ? delta.content : "";
  const reasoning = typeof delta.reasoning_content === "string" ? delta.reasoning_content : "";
  if (content || reasoning) yield { content, reasoning };
  if (choice?.finish_reason) yield { finish: choice.finish_reason };
  if (chunk.usage) yield { usage: chunk.usage };
}

// Messages from the hub often end in a full stop; ours add their own.
function detail(error) {
  return error.message.replace(/[.\s]+$/, "");
}

// A wait in words a person reads at a glance: 45 s, 12 min, 3 h.
export function formatWait(seconds) {
  if (seconds < 90) return `${seconds} s`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds / 3600)} h`;
}

export function describeError(error, modelName) {
  const model = modelName || "this model";
  const wait = error.retryAfter != null ? ` Try again in ${formatWait(error.retryAfter)}.` : "";
  switch (error.kind) {
    case "auth":
      return `Your API key was not accepted (401): ${detail(error)}. Log in with a valid key.`;
    case "forbidden":
      return `Your key may not use ${model} (403): ${detail(error)}.`;
    case "rate":
      return `Rate limit reached (429): ${detail(error)}.${wait || " Try again later."}`;
    case "busy":
      return (
        `${model} is busy: all of its capacity is in use (${error.status}). ` +
        `${detail(error)}.${wait || " Try again in a minute."}`
      );
    case "loading":
      return (
        `${model} is not ready yet (503): ${detail(error)}.` +
        (wait || " It is starting on the cluster; try again in a minute.")
      );
    case "network":
      return `Network problem: ${detail(error)}.`;
    case "stream":
      return `The answer was interrupted: ${detail(error)}.`;
    default:
      return `The hub answered ${error.status}: ${detail(error)}.`;
  }
}
