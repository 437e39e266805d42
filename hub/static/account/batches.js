// The account page's Batches panel: the person's own /v1/batches (the session acts like a
// key there), newest first, paged with `after` as the API does. Everything from the API is
// put in the page with textContent / attributes only: ids, model names and error messages
// come from users.
import { api, el, number, when } from "../chat/pages/charts.js";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 10;
const REFRESH_MS = 3000; // while a batch on the page is still active
const ACTIVE = new Set(["validating", "in_progress", "finalizing", "cancelling"]);
const CANCELLABLE = new Set(["validating", "in_progress"]);
const ENDED = ["completed_at", "failed_at", "cancelled_at", "expired_at"];

const state = {
  cursors: [null], // `after` of each page shown so far: the last is the current page
  timer: null, // the one pending refresh, if any
  armed: new Set(), // batches whose Cancel was pressed once (the second press cancels)
  loading: false,
  again: false,
};

function say(text) {
  $("batches-problem").textContent = text;
  $("batches-problem").hidden = !text;
}

export function progressText(counts) {
  const total = counts?.total ?? 0;
  const done = (counts?.completed ?? 0) + (counts?.failed ?? 0);
  const failed = counts?.failed ? `, ${number(counts.failed)} failed` : "";
  return `${number(done)} of ${number(total)}${failed}`;
}

function progressCell(batch) {
  const counts = batch.request_counts ?? {};
  const text = progressText(counts);
  const bar = el("progress", {
    max: String(Math.max(counts.total ?? 0, 1)),
    value: String((counts.completed ?? 0) + (counts.failed ?? 0)),
    "aria-label": `${batch.id}: ${text}`,
  });
  return el("td", { class: "progress" }, bar, el("span", { class: "count", text }));
}

function download(fileId, batchId, kind) {
  // A plain same-origin link: the browser sends the session cookie (SameSite=Strict holds
  // for same-origin navigations) and no body, so the CSRF rule lets it through; `download`
  // names the saved file, as the hub's answer names none.
  return el("a", {
    href: `../v1/files/${encodeURIComponent(fileId)}/content`,
    download: `${batchId}-${kind}.jsonl`,
    "data-file": kind,
    "data-focus-key": `${kind}:${batchId}`,
    text: kind === "output" ? "Output" : "Errors",
  });
}

function filesCell(batch) {
  const cell = el("td", { class: "files" });
  if (batch.output_file_id) cell.append(download(batch.output_file_id, batch.id, "output"));
  if (batch.error_file_id) cell.append(download(batch.error_file_id, batch.id, "errors"));
  return cell;
}

function statusCell(batch) {
  const cell = el("td", { class: `status status-${batch.status}`, text: batch.status.replaceAll("_", " ") });
  const message = batch.errors?.data?.[0]?.message;
  if (message) cell.append(el("div", { class: "muted why", text: message }));
  return cell;
}

function cancelCell(batch) {
  const cell = el("td", {});
  if (!CANCELLABLE.has(batch.status)) return cell;
  const armed = state.armed.has(batch.id);
  const button = el("button", {
    type: "button", class: armed ? "button danger" : "button quiet", "data-cancel": batch.id,
    "data-focus-key": `cancel:${batch.id}`, "aria-label": armed ? `Confirm: cancel batch ${batch.id}` : `Cancel batch ${batch.id}`,
    text: armed ? "Confirm cancel" : "Cancel",
  });
  button.addEventListener("click", () => pressCancel(batch.id));
  cell.append(button);
  return cell;
}

function row(batch) {
  const ended = ENDED.map((name) => batch[name]).find((value) => value);
  return el("tr", { "data-batch": batch.id, "data-status": batch.status },
    el("th", { scope: "row", class: "mono", text: batch.id }), el("td", { text: batch.model ?? "" }),
    statusCell(batch), el("td", { text: when(batch.created_at) }), el("td", { text: when(ended) }),
    progressCell(batch), filesCell(batch), cancelCell(batch));
}

function render(page) {
  // Keep the keyboard focus on the same control across a refresh.
  const focused = document.activeElement?.dataset?.focusKey;
  const first = state.cursors.length === 1;
  $("batches").replaceChildren(...page.data.map(row));
  $("batches-table").hidden = !page.data.length;
  $("batches-empty").hidden = page.data.length > 0 || !first;
  $("batches-newer").hidden = first;
  $("batches-older").hidden = !page.has_more;
  $("batches-pager").hidden = first && !page.has_more;
  if (focused) document.querySelector(`[data-focus-key="${CSS.escape(focused)}"]`)?.focus();
}

function schedule(page) {
  clearTimeout(state.timer);
  state.timer = null;
  // No refresh while the tab is hidden (visibilitychange restarts it) or nothing moves.
  if (document.hidden || !page.data.some((batch) => ACTIVE.has(batch.status))) return;
  state.timer = setTimeout(load, REFRESH_MS);
}

export async function load() {
  // One request at a time; a load asked for meanwhile (a click) runs once it is back.
  if (state.loading) { state.again = true; return; }
  state.loading = true;
  state.again = false;
  const after = state.cursors[state.cursors.length - 1];
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (after) query.set("after", after);
  try {
    const page = await api(`../v1/batches?${query}`);
    say("");
    render(page);
    schedule(page);
  } catch (error) {
    if (error.status === 404 && state.cursors.length === 1) { $("batches-panel").hidden = true; return; }
    say(`Could not load your batches: ${error.message}`);
    // A passing problem (the hub restarting): try again while the tab is open; a lost
    // login is not retried.
    if (error.status !== 401 && error.status !== 403) schedule({ data: [{ status: "in_progress" }] });
  } finally {
    state.loading = false;
  }
  if (state.again) await load();
}

async function pressCancel(id) {
  if (!state.armed.has(id)) {
    state.armed.add(id);
    await load();
    return;
  }
  state.armed.delete(id);
  try {
    // A JSON body, as the CSRF rule wants of every request with a body.
    await api(`../v1/batches/${encodeURIComponent(id)}/cancel`, { method: "POST", body: {} });
  } catch (error) { say(`Could not cancel ${id}: ${error.message}`); }
  await load();
}

function turn(older) {
  const rows = [...$("batches").querySelectorAll("tr[data-batch]")];
  if (older && rows.length) state.cursors.push(rows[rows.length - 1].dataset.batch);
  else if (!older && state.cursors.length > 1) state.cursors.pop();
  state.armed.clear();
  load();
}

export function startBatches() {
  $("batches-base").textContent = `${window.location.origin}/v1`;
  $("batches-older").addEventListener("click", () => turn(true));
  $("batches-newer").addEventListener("click", () => turn(false));
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) { clearTimeout(state.timer); state.timer = null; } else load();
  });
  return load();
}
