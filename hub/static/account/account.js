// The self-service page: the logged-in user's usage against their limits, their keys and
// their batches (batches.js).
import { api, drawChart, el, number, seriesData, when } from "../chat/pages/charts.js";
import { startBatches } from "./batches.js";

const $ = (id) => document.getElementById(id);

function showProblem(error) {
  $("problem").textContent = error.message;
  $("problem").hidden = false;
}

function card(title, used, limit, unit) {
  const figure = el("div", { class: "figure", text: number(used) });
  const of = el("div", { class: "of", text: limit == null ? `${unit}, no limit` : `of ${number(limit)} ${unit}` });
  const node = el("div", { class: "card" }, el("div", { text: title }), figure, of);
  if (limit != null) node.append(el("meter", { min: "0", max: String(limit), value: String(Math.min(used, limit)), "aria-label": title }));
  return node;
}

function renderUsage(usage) {
  const limits = usage.user_limits;
  $("cards").replaceChildren(
    card("Requests today", usage.today.requests, limits.requests_per_day, "requests"),
    card("Tokens today", usage.today.tokens, limits.tokens_per_day, "tokens"),
    card("Requests this month", usage.month.requests, limits.requests_per_month, "requests"),
    card("Tokens this month", usage.month.tokens, limits.tokens_per_month, "tokens"),
  );
  const daily = seriesData(usage.daily, "model", "tokens");
  const dayLimit = limits.tokens_per_day != null ? [{ label: "daily limit", value: limits.tokens_per_day }] : [];
  if (daily.data[0].length) drawChart($("chart-daily"), "Tokens per day this month, by model", daily.names, daily.data, dayLimit);
  else $("chart-daily").replaceChildren(el("p", { class: "muted", text: "No usage this month yet." }));
  drawModels(usage);
}

function drawModels(usage) {
  // Cumulative tokens this month per model, against the monthly limit.
  const rows = [...usage.daily].sort((a, b) => a.start - b.start);
  const running = new Map();
  const cumulative = rows.map((row) => {
    running.set(row.model, (running.get(row.model) ?? 0) + row.tokens);
    return { ...row, tokens: [...running.values()].reduce((a, b) => a + b, 0) };
  });
  const total = seriesData(cumulative.map((row) => ({ ...row, all: "all models" })), "all", "tokens", 1);
  // Several models on one day: keep the day's last running total.
  total.data[1] = total.data[0].map((x) => Math.max(...cumulative.filter((r) => r.start === x).map((r) => r.tokens)));
  const limit = usage.user_limits.tokens_per_month;
  if (total.data[0].length) {
    drawChart($("chart-models"), "Tokens this month, running total", total.names, total.data,
      limit != null ? [{ label: "monthly limit", value: limit }] : []);
  }
}

function keyState(key) {
  if (key.revoked_at) return "revoked";
  if (key.expires_at && key.expires_at * 1000 < Date.now()) return "expired";
  return "active";
}

function renderKeys(keys) {
  $("keys").replaceChildren(...keys.map((key) => {
    const state = keyState(key);
    const revoke = el("button", { type: "button", class: "button quiet", "data-key": key.id, text: "Revoke" });
    revoke.hidden = state !== "active";
    revoke.addEventListener("click", () => revokeKey(key.id));
    return el("tr", { "data-key-row": key.id },
      el("td", { text: key.name }), el("td", { text: key.id }),
      el("td", { text: when(key.created_at) }), el("td", { text: when(key.expires_at) }),
      el("td", { class: `state-${state}`, text: state }), el("td", {}, revoke));
  }));
}

async function refresh() {
  const [usage, keys] = await Promise.all([api("../me/usage"), api("../me/keys")]);
  renderUsage(usage);
  renderKeys(keys);
}

async function revokeKey(id) {
  try {
    await api(`../me/keys/${encodeURIComponent(id)}`, { method: "DELETE" });
    await refresh();
  } catch (error) { showProblem(error); }
}

async function createKey(event) {
  event.preventDefault();
  $("problem").hidden = true;
  try {
    const made = await api("../me/keys", { method: "POST", body: { name: $("key-name").value } });
    $("secret").textContent = made.secret;
    $("new-secret").hidden = false;
    $("key-name").value = "";
    await refresh();
  } catch (error) { showProblem(error); }
}

async function logout() {
  let answer;
  try { answer = await api("../auth/logout", { method: "POST" }); } catch (error) { showProblem(error); return; }
  // End the login at the provider too (it sends the browser back to this page).
  if (answer && answer.provider_logout_url) window.location.assign(answer.provider_logout_url);
  else window.location.reload();
}

async function start() {
  let me;
  try {
    me = await api("../me");
  } catch (error) {
    if (error.status === 401 || error.status === 403) { $("login").hidden = false; return; }
    showProblem(error);
    return;
  }
  $("who").textContent = me.group ? `${me.user} (${me.group})` : me.user;
  $("logout").hidden = false;
  $("dashboard-link").hidden = !me.admin;
  const lifetime = me.key_lifetime_days ? `, valid ${me.key_lifetime_days} days` : "";
  $("key-policy").textContent = `Up to ${me.keys_per_user} active keys${lifetime}. ` +
    `Per-key limits: ${Object.entries(me.key_limits).map(([k, v]) => `${k.replaceAll("_", " ")} ${number(v)}`).join(", ") || "none"}.`;
  $("content").hidden = false;
  $("new-key").addEventListener("submit", createKey);
  $("logout").addEventListener("click", logout);
  await Promise.all([refresh().catch(showProblem), startBatches()]);
  document.body.dataset.loaded = "true";
}

start();
