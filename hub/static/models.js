// What the page shows about a model: pure functions over the hub's /v1/models answer.

const STATUSES = new Set(["ready", "loading", "offline"]);

// The hub reports demand as a number (requests waiting or running per instance).
export function demandLevel(demand) {
  if (typeof demand !== "number" || !Number.isFinite(demand)) return null;
  if (demand <= 1) return "low";
  if (demand <= 3) return "medium";
  return "high";
}

// A model can chat unless it says it produces something other than text (embeddings).
function canChat(model) {
  return !Array.isArray(model.output) || model.output.includes("text");
}

export function normalizeModels(payload) {
  const list = payload && Array.isArray(payload.data) ? payload.data : [];
  return list
    .filter((model) => model && typeof model.id === "string" && canChat(model))
    .map((model) => ({
      id: model.id,
      name: typeof model.name === "string" && model.name ? model.name : model.id,
      status: STATUSES.has(model.status) ? model.status : null,
      demand: demandLevel(model.demand),
    }))
    .sort((a, b) => a.name.localeCompare(b.name));
}

export function describeModel(model) {
  const parts = [];
  if (model.status) parts.push(model.status);
  if (model.demand) parts.push(`demand ${model.demand}`);
  return parts.join(" · ");
}
