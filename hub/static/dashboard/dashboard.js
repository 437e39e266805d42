// The operator dashboard: services' state, usage over time by model, group and user, keys.
import { api, drawChart, el, number, seriesData, when } from "../chat/pages/charts.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 10_000;

function showProblem(error) {
  $("problem").textContent = error.message;
  $("problem").hidden = false;
}

function range() {
  const month = $("range").value === "month";
  const span = month ? 30 * 86400 : 86400;
  const since = new Date(Date.now() - span * 1000).toISOString().slice(0, 19);
  return { since, bucket: month ? "day" : "hour" };
}

async function series(by) {
  const { since, bucket } = range();
  const query = new URLSearchParams({ since, by, bucket });
  return api(`../admin/usage/series?${query}`);
}

function chart(id, title, rows, by, field) {
  const { names, data } = seriesData(rows, by, field);
  if (!data[0].length) {
    $(id).replaceChildren(el("p", { class: "muted", text: `${title}: no usage in this range.` }));
    return;
  }
  drawChart($(id), title, names, data);
}

async function drawUsage() {
  const [models, groups, users] = await Promise.all([series("model"), series("group"), series("user")]);
  chart("chart-model", "Tokens by model", models, "model", "tokens");
  chart("chart-group", "Tokens by group", groups, "group", "tokens");
  chart("chart-user", "Tokens by user", users, "user", "tokens");
  chart("chart-requests", "Requests by model", models, "model", "requests");
}

async function drawServices() {
  const services = await api("../admin/services");
  $("services").replaceChildren(...services.map((s) => el("tr", { "data-service": s.id },
    el("td", { text: s.id }), el("td", { text: s.upstream }),
    el("td", { class: `state-${s.status}`, text: s.status }),
    el("td", { text: instancesText(s) }), el("td", { text: queueText(s) }),
    el("td", { text: s.demand.toFixed(2) }), el("td", { text: String(s.in_flight) }))));
}

// "2", "2 (+1 starting)"; "—" for a provider (ready, but no instances of ours).
function instancesText(s) {
  if (!s.instances && !s.starting && s.status === "ready") return "—";
  return s.starting ? `${s.instances} (+${s.starting} starting)` : String(s.instances);
}

function queueText(s) {
  return s.queued ? `${s.queued} (${s.oldest_wait.toFixed(0)} s)` : "0";
}

function limitsText(limits) {
  return Object.entries(limits).map(([k, v]) => `${k.replaceAll("_", " ")} ${number(v)}`).join(", ") || "default";
}

async function drawKeys() {
  const keys = await api("../admin/keys");
  $("keys").replaceChildren(...keys.map((key) => el("tr", {},
    el("td", { text: key.name }), el("td", { text: key.id }), el("td", { text: key.owner ?? "—" }),
    el("td", { text: key.group ?? "—" }), el("td", { text: limitsText(key.limits) }),
    el("td", { text: when(key.created_at) }),
    el("td", { text: key.revoked_at ? "revoked" : key.admin ? "active (admin)" : "active" }))));
}

async function refresh() {
  try {
    await Promise.all([drawServices(), drawUsage(), drawKeys()]);
    $("problem").hidden = true;
  } catch (error) { showProblem(error); }
}

async function start() {
  try {
    const me = await api("../me");
    $("who").textContent = me.user;
    if (!me.admin) { showProblem(new Error("you are not in the admin group")); return; }
  } catch (error) {
    if (error.status === 401 || error.status === 403) { $("login").hidden = false; return; }
    showProblem(error);
    return;
  }
  $("content").hidden = false;
  $("range").addEventListener("change", refresh);
  await refresh();
  document.body.dataset.loaded = "true";
  setInterval(refresh, REFRESH_MS);
}

start();
