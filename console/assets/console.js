// The operator console: jobs by status, a page per job, cancel and retry.
// Served by the app (console.py); docs/console.md is the operators' manual.
//
// Safe by construction: every value from the API or the URL goes into the
// page as text (text nodes, textContent), never as HTML; the page's CSP
// refuses inline code and string-to-HTML sinks. The token lives in
// sessionStorage only and travels in the Authorization header only.
// Every URL is relative, so the console works under a stage prefix.

const TOKEN_KEY = "console.token";
const PKCE_KEY = "console.pkce";
const REFRESH_MS = 5000;
const PAGE_SIZE = 50;
const MAX_PAGE = 1000; // the list's largest `limit`
const EVENTS_PAGE = 100;
const EVENT_PAGES_PER_LOAD = 10; // 1000 events, then a "More events" button
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const NUMBER = new Intl.NumberFormat("en-US");

const state = {
  config: null,
  token: null,
  claims: null,
  paused: false,
  view: null, // {kind: "jobs" | "job" | "signin" | "missing", ...}
};

// --- DOM helpers -------------------------------------------------------------

/** An element with attributes (strings), listeners (on...: functions) and
 *  children (nodes, or strings that become text nodes). */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (typeof value === "function") node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** Replace `node`'s children (null and false are left out). */
function fill(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

const $ = (id) => document.getElementById(id);
const count = (n) => NUMBER.format(n);
const capitalized = (text) => text.charAt(0).toUpperCase() + text.slice(1);

function notice(message, kind = "error") {
  const box = $("notice");
  box.dataset.kind = kind;
  $("notice-text").textContent = message;
  box.hidden = false;
}

function clearNotice() {
  $("notice").hidden = true;
}

// --- Time ----------------------------------------------------------------------

/** "45 s", "3 min", "2 h", "4 d". */
function duration(seconds) {
  const s = Math.abs(seconds);
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

/** "3 min ago", "in 20 s": how far `iso` is from now. */
function ago(iso) {
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  if (Math.abs(seconds) < 5) return seconds < 0 ? "in a moment" : "just now";
  return seconds < 0 ? `in ${duration(seconds)}` : `${duration(seconds)} ago`;
}

/** A <time> that says how long ago, with the exact instant as its title;
 *  refreshed by the ticker while the page is open. */
function when(iso) {
  if (!iso) return el("span", { class: "muted" }, "—");
  return el("time", { datetime: iso, title: iso, "data-ago": "" }, ago(iso));
}

function refreshAges() {
  for (const node of document.querySelectorAll("time[data-ago]")) {
    node.textContent = ago(node.getAttribute("datetime"));
  }
}

// --- The API -------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The API's `detail` (or the gateway's `message`) in words. */
function describe(body, status) {
  const detail = body && (body.detail ?? body.message);
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((item) => [item.loc?.slice(1).join("."), item.msg].filter(Boolean).join(": "))
      .join("; ");
  }
  return `HTTP ${status}`;
}

function explain(status, detail) {
  if (status === 401) return `Not signed in, or the token was refused (401): ${detail}`;
  if (status === 403) return `Forbidden (403): ${detail}`;
  if (status === 0) return detail;
  return `${detail} (HTTP ${status})`;
}

/** The `rel="next"` link's query, e.g. its cursor; null when none. */
function nextLink(header) {
  const match = header && /<([^>]*)>\s*;\s*rel="?next"?/.exec(header);
  return match ? new URL(match[1], document.baseURI).searchParams : null;
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (error) {
    throw new ApiError(0, `The API cannot be reached: ${error.message}`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new ApiError(response.status, explain(response.status, describe(data, response.status)));
    if (response.status === 401 && state.config.auth_enabled && state.token) forgetToken();
    throw error;
  }
  return { data, next: nextLink(response.headers.get("Link")) };
}

const jobPath = (id) => `extraction-jobs/${encodeURIComponent(id)}`;

// --- Sign-in -------------------------------------------------------------------

function base64url(bytes) {
  let text = "";
  for (const byte of new Uint8Array(bytes)) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomText(bytes) {
  return base64url(crypto.getRandomValues(new Uint8Array(bytes)));
}

/** The token's claims, for display only (the API checks the signature). */
function decodeClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(part), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

function permissions(claims) {
  const granted = new Set();
  if (typeof claims?.scope === "string") claims.scope.split(/\s+/).filter(Boolean).forEach((p) => granted.add(p));
  if (Array.isArray(claims?.permissions)) claims.permissions.filter((p) => typeof p === "string").forEach((p) => granted.add(p));
  return granted;
}

function useToken(token) {
  const claims = decodeClaims(token);
  if (claims && typeof claims.exp === "number" && claims.exp * 1000 < Date.now()) {
    notice("That token has expired: sign in again.");
    return false;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  state.token = token;
  state.claims = claims;
  return true;
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  state.claims = null;
  renderSession();
}

/** Why cancel and retry are off for this token, or null when they are on.
 *  Display only: the API decides, and its 403 is shown as it comes. */
function adminBlocker() {
  const config = state.config;
  if (!config.auth_enabled || !config.permissions_checked || !state.claims) return null;
  if (permissions(state.claims).has(config.admin_permission)) return null;
  return `Your token lacks the ${config.admin_permission} permission: cancel and retry are disabled.`;
}

const redirectUri = () => `${location.origin}${location.pathname}`;

async function signInWithAuth0() {
  const { domain, audience, client_id: clientId } = state.config.auth0;
  const verifier = randomText(32);
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  const nonce = randomText(16);
  sessionStorage.setItem(PKCE_KEY, JSON.stringify({ verifier, state: nonce, hash: location.hash }));
  const query = new URLSearchParams({
    response_type: "code",
    client_id: clientId,
    redirect_uri: redirectUri(),
    audience,
    scope: `${state.config.read_permission} ${state.config.admin_permission}`,
    state: nonce,
    code_challenge: challenge,
    code_challenge_method: "S256",
  });
  location.assign(`https://${domain}/authorize?${query}`);
}

/** Back from Auth0 with ?code=...&state=...: trade the code for a token
 *  (PKCE, no client secret), then take the query out of the address. */
async function finishAuth0SignIn() {
  const query = new URLSearchParams(location.search);
  if (!query.has("code") && !query.has("error")) return;
  const saved = JSON.parse(sessionStorage.getItem(PKCE_KEY) || "null");
  sessionStorage.removeItem(PKCE_KEY);
  history.replaceState(null, "", `${location.pathname}${saved?.hash || ""}`);
  if (query.has("error")) {
    notice(`Auth0 refused the sign-in: ${query.get("error_description") || query.get("error")}`);
    return;
  }
  if (!saved || saved.state !== query.get("state") || !state.config.auth0?.client_id) {
    notice("That sign-in answer does not belong to a sign-in started here: sign in again.");
    return;
  }
  const { domain, client_id: clientId } = state.config.auth0;
  try {
    const response = await fetch(`https://${domain}/oauth/token`, {
      method: "POST",
      body: new URLSearchParams({
        grant_type: "authorization_code",
        client_id: clientId,
        code_verifier: saved.verifier,
        code: query.get("code"),
        redirect_uri: redirectUri(),
      }),
      cache: "no-store",
      credentials: "omit",
    });
    const data = await response.json().catch(() => null);
    if (!response.ok || typeof data?.access_token !== "string") {
      notice(`Auth0 gave no token: ${data?.error_description || data?.error || `HTTP ${response.status}`}`);
      return;
    }
    useToken(data.access_token);
  } catch (error) {
    notice(`Auth0 cannot be reached: ${error.message}`);
  }
}

function renderSession() {
  const box = $("session");
  box.replaceChildren();
  const config = state.config;
  if (!config.auth_enabled) {
    box.append(el("span", { class: "badge warn" }, "Auth disabled"));
    return;
  }
  if (!state.token) return;
  const claims = state.claims || {};
  const granted = [...permissions(claims)].sort();
  append(box, [
    el("span", { class: "who" }, "Signed in", claims.sub ? [" as ", el("strong", {}, String(claims.sub))] : null),
    el(
      "span",
      { class: "muted perms", title: granted.join(" ") },
      granted.length ? granted.join(", ") : "no permissions in the token",
    ),
    typeof claims.exp === "number" ? el("span", { class: "muted" }, "· expires ", when(new Date(claims.exp * 1000).toISOString())) : null,
    el("button", { type: "button", id: "sign-out", onclick: signOut }, "Sign out"),
  ]);
}

function signOut() {
  forgetToken();
  clearNotice();
  route();
}

function showSignIn() {
  state.view = { kind: "signin" };
  $("refresh").hidden = true;
  const input = el("input", {
    id: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "token-help",
  });
  const form = el(
    "form",
    { class: "signin", onsubmit: (event) => {
      event.preventDefault();
      const token = input.value.trim();
      input.value = "";
      if (!/^[\x21-\x7e]+$/.test(token)) {
        notice("That is not an access token: a token is one word of printable ASCII characters.");
        return;
      }
      if (useToken(token)) {
        clearNotice();
        renderSession();
        route();
      }
    } },
    el("label", { for: "token" }, "Access token"),
    input,
    el(
      "p",
      { id: "token-help", class: "muted" },
      `Paste an access token for this API (reading needs ${state.config.read_permission}, cancel and retry ${state.config.admin_permission}). It is kept in this tab only (sessionStorage) and sent only to this API.`,
    ),
    el("button", { type: "submit", class: "primary" }, "Use token"),
  );
  const main = $("main");
  fill(main, el("h1", {}, "Sign in"), form);
  if (state.config.auth0?.client_id) {
    main.append(
      el("p", { class: "or" }, "or"),
      el("button", { type: "button", id: "auth0-sign-in", class: "primary", onclick: signInWithAuth0 }, "Sign in with Auth0"),
    );
  }
  input.focus();
}

// --- Routing -------------------------------------------------------------------

function route() {
  if (state.config.auth_enabled && !state.token) return showSignIn();
  const hash = location.hash.replace(/^#/, "") || "/";
  const split = hash.indexOf("?");
  const path = split < 0 ? hash : hash.slice(0, split);
  const query = new URLSearchParams(split < 0 ? "" : hash.slice(split + 1));
  const job = /^\/jobs\/([^/?]+)$/.exec(path);
  $("refresh").hidden = false;
  if (job) return showJob(decodeURIComponent(job[1]));
  return showJobs(query);
}

function jobsHash(filter) {
  const query = new URLSearchParams();
  for (const name of ["status", "document_id", "worker_id"]) {
    if (filter[name]) query.set(name, filter[name]);
  }
  const text = query.toString();
  return text ? `#/?${text}` : "#/";
}

// --- Auto-refresh ----------------------------------------------------------------

function tick() {
  refreshAges();
  if (state.paused || document.hidden || document.querySelector("dialog[open]")) return;
  refreshView();
}

/** Run `task` once the view's earlier loads are done: one load at a time,
 *  so a refresh and "More" never interleave their rows. */
function inTurn(view, task) {
  const run = (view.chain || Promise.resolve()).then(task);
  view.chain = run.catch(() => {});
  return run;
}

/** Load the view's data again, after any load in flight (so an action's
 *  result is never hidden by an older answer); asks made while one is
 *  waiting its turn are the same ask. */
function refreshView() {
  const view = state.view;
  if (!view || !["jobs", "job"].includes(view.kind) || view.refreshWaiting) return;
  view.refreshWaiting = true;
  return inTurn(view, async () => {
    view.refreshWaiting = false;
    if (view !== state.view) return;
    try {
      await (view.kind === "jobs" ? refreshJobs(view) : refreshJob(view));
      if (view === state.view) $("refresh-state").textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;
    } catch (error) {
      if (view === state.view) failed(error);
    }
  });
}

function failed(error) {
  notice(error.message || String(error));
  if (error.status === 401 && state.config.auth_enabled && !state.token) route();
}

function togglePause() {
  state.paused = !state.paused;
  const button = $("refresh-toggle");
  button.setAttribute("aria-pressed", String(state.paused));
  button.textContent = state.paused ? "Resume auto-refresh" : "Pause auto-refresh";
  $("refresh-state").textContent = state.paused ? "auto-refresh paused" : "";
}

// --- The jobs list -------------------------------------------------------------

function readFilter(query) {
  const status = query.get("status");
  return {
    status: state.config.statuses.includes(status) ? status : null,
    document_id: query.get("document_id") || null,
    worker_id: query.get("worker_id") || null,
  };
}

const filtered = (filter) => Boolean(filter.status || filter.document_id || filter.worker_id);

function listPath(filter, { limit, cursor }) {
  const query = new URLSearchParams({ order: "desc", limit: String(limit) });
  for (const name of ["status", "document_id", "worker_id"]) {
    if (filter[name]) query.set(name, filter[name]);
  }
  if (cursor) query.set("cursor", cursor);
  return `extraction-jobs?${query}`;
}

function showJobs(query) {
  const filter = readFilter(query);
  const view = { kind: "jobs", filter, rows: [], cursor: null, stats: null };
  state.view = view;
  const limits = state.config.limits;
  const search = el(
    "form",
    { class: "search", role: "search", onsubmit: (event) => {
      event.preventDefault();
      const data = new FormData(event.target);
      const target = jobsHash({
        status: filter.status,
        document_id: data.get("document_id").trim(),
        worker_id: data.get("worker_id").trim(),
      });
      if (location.hash === target) refreshView();
      else location.hash = target;
    } },
    el("div", { class: "field" },
      el("label", { for: "document-id" }, "Document id (exact)"),
      el("input", { id: "document-id", name: "document_id", type: "search", maxlength: limits.document_id, value: filter.document_id || "" }),
    ),
    el("div", { class: "field" },
      el("label", { for: "worker-id" }, "Worker id (exact)"),
      el("input", { id: "worker-id", name: "worker_id", type: "search", maxlength: limits.worker_id, value: filter.worker_id || "" }),
    ),
    el("div", { class: "field buttons" },
      el("button", { type: "submit", class: "primary" }, "Search"),
      filter.document_id || filter.worker_id
        ? el("a", { class: "button", href: jobsHash({ status: filter.status }) }, "Clear")
        : null,
    ),
  );
  fill($("main"), 
    el("h1", {}, "Jobs"),
    el("nav", { class: "tabs", id: "tabs", "aria-label": "Jobs by status" }),
    el("p", { class: "muted", id: "queue" }),
    search,
    el("div", { id: "bulk", class: "bulk" }),
    el("div", { class: "table-wrap" },
      el("table", { class: "jobs", id: "jobs" },
        el("caption", { class: "sr-only" }, "Jobs, newest first"),
        el("thead", {}, el("tr", {}, ["Document id", "Status", "Priority", "Attempts", "Worker", "Created", "Updated"].map((name) => el("th", { scope: "col" }, name)))),
        el("tbody", { id: "rows" }),
      ),
    ),
    el("p", { id: "list-state", class: "muted", "aria-live": "polite" }, "Loading…"),
    el("button", { type: "button", id: "more", hidden: true, onclick: () => loadMore(view) }, "More"),
  );
  renderBulk(view);
  refreshView();
}

/** The first page again, as long as what is shown (so "more" pages stay),
 *  and the counts. */
async function refreshJobs(view) {
  const limit = Math.min(MAX_PAGE, Math.max(PAGE_SIZE, view.rows.length));
  const [stats, page] = await Promise.all([
    api("extraction-jobs/stats"),
    api(listPath(view.filter, { limit })),
  ]);
  if (view !== state.view) return;
  view.stats = stats.data;
  view.rows = page.data;
  view.cursor = page.next?.get("cursor") || null;
  renderTabs(view);
  renderRows(view);
}

function loadMore(view) {
  const button = $("more");
  button.disabled = true;
  return inTurn(view, async () => {
    try {
      const page = await api(listPath(view.filter, { limit: PAGE_SIZE, cursor: view.cursor }));
      if (view !== state.view) return;
      view.rows.push(...page.data);
      view.cursor = page.next?.get("cursor") || null;
      renderRows(view);
    } catch (error) {
      failed(error);
    } finally {
      button.disabled = false;
    }
  });
}

function renderTabs(view) {
  const { counts, estimated } = view.stats;
  const approximate = new Set(estimated);
  const total = Object.values(counts).reduce((sum, n) => sum + n, 0);
  const tabs = [{ status: null, label: "All", n: total, estimated: approximate.size > 0 }].concat(
    state.config.statuses.map((status) => ({ status, label: status, n: counts[status] ?? 0, estimated: approximate.has(status) })),
  );
  fill($("tabs"), 
    ...tabs.map((tab) => el(
      "a",
      {
        class: "tab",
        href: jobsHash({ ...view.filter, status: tab.status }),
        "aria-current": tab.status === view.filter.status ? "page" : null,
        "data-status": tab.status || "all",
      },
      el("span", { class: "label" }, tab.label),
      " ",
      el("span", { class: "count", title: tab.estimated ? "estimated by the database (over 10,000 jobs)" : null },
        tab.estimated ? `≈${count(tab.n)}` : count(tab.n)),
    )),
  );
  const facts = [];
  const age = view.stats.oldest_pending_age_seconds;
  facts.push(age === null ? "No pending job is due" : `The oldest due pending job has waited ${duration(age)}`);
  if (view.stats.expired_leases) facts.push(`${count(view.stats.expired_leases)} expired lease(s) not yet swept`);
  if (approximate.size) facts.push("≈ marks a count the database estimates (over 10,000 jobs)");
  $("queue").textContent = facts.join(" · ");
}

function statusBadge(status) {
  const known = state.config.statuses.includes(status);
  return el("span", { class: `status status-${known ? status : "unknown"}` }, status);
}

/** A cell, labelled for the phone layout (one card per job). */
function cell(label, ...children) {
  return el("td", { "data-label": label }, el("span", {}, children));
}

function renderRows(view) {
  const rows = view.rows.map((job) => el(
    "tr",
    { "data-job-id": job.id },
    cell("Document id", el("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "doc" }, job.document_id)),
    cell("Status", statusBadge(job.status), job.cancel_requested_at && job.status === "processing" ? el("span", { class: "muted small" }, " cancel requested") : null),
    cell("Priority", job.priority),
    cell("Attempts", `${job.attempts}/${job.max_attempts}`),
    cell("Worker", job.worker_id ?? el("span", { class: "muted" }, "—")),
    cell("Created", when(job.created_at)),
    cell("Updated", when(job.updated_at)),
  ));
  fill($("rows"), ...rows);
  $("list-state").textContent = view.rows.length
    ? `${count(view.rows.length)} shown, newest first${view.cursor ? "; more follow" : ""}`
    : "No jobs match.";
  $("more").hidden = !view.cursor;
}

// --- Actions -------------------------------------------------------------------

/** A modal dialog: `content` and `actions` are filled by the caller. */
function modal(title) {
  const heading = el("h2", { id: "dialog-title" }, title);
  const content = el("div", { class: "dialog-content" });
  const error = el("p", { class: "error", role: "alert", hidden: true });
  const actions = el("div", { class: "actions" });
  const dialog = el("dialog", { "aria-labelledby": "dialog-title" }, heading, content, error, actions);
  const box = {
    dialog, content, actions, busy: false,
    close() { dialog.close(); },
    fail(message) { error.textContent = message; error.hidden = false; },
  };
  dialog.addEventListener("cancel", (event) => { if (box.busy) event.preventDefault(); });
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  return box;
}

/** A button that is disabled, with the reason next to it, when `blocker`
 *  (a reason) is given. */
function actionButton(label, onclick, { kind = "", blocker = null } = {}) {
  const button = el("button", { type: "button", class: kind, onclick, disabled: Boolean(blocker) }, label);
  if (!blocker) return button;
  const reason = el("span", { class: "reason", id: `reason-${label.toLowerCase().replace(/\W+/g, "-")}` }, blocker);
  button.setAttribute("aria-describedby", reason.id);
  return el("span", { class: "action" }, button, reason);
}

function reasonField(id) {
  return [
    el("label", { for: id }, "Reason (optional, kept in the history)"),
    el("textarea", { id, rows: 2, maxlength: state.config.limits.reason }),
  ];
}

function confirmAction(job, action) {
  const cancelling = action === "cancel";
  const box = modal(`${cancelling ? "Cancel" : "Retry"} job ${job.document_id}?`);
  const explanation = cancelling
    ? job.status === "pending"
      ? "It is pending: it becomes cancelled at once."
      : "It is processing: its worker is asked to stop at its next heartbeat; if its lease runs out first, it is cancelled then."
    : `It goes back to pending with a fresh allowance of ${job.max_attempts} attempt(s).`;
  append(box.content, [el("p", {}, explanation), cancelling ? reasonField("action-reason") : null]);
  const run = async () => {
    box.busy = true;
    confirm.disabled = true;
    const reason = cancelling ? $("action-reason").value.trim() : "";
    try {
      await api(`${jobPath(job.id)}/${action}`, { method: "POST", body: reason ? { reason } : {} });
      box.busy = false;
      box.close();
      notice(cancelling ? `Cancel sent for ${job.document_id}.` : `${job.document_id} is pending again.`, "ok");
      refreshView();
    } catch (error) {
      box.busy = false;
      confirm.disabled = false;
      box.fail(error.message);
    }
  };
  const confirm = el("button", { type: "button", class: "danger", id: "confirm" }, cancelling ? "Cancel the job" : "Retry the job");
  confirm.addEventListener("click", run);
  box.actions.append(confirm, el("button", { type: "button", onclick: () => box.close() }, "Back"));
  confirm.focus();
}

function bulkFilter(filter) {
  const selection = {};
  if (filter.status) selection.status = [filter.status];
  if (filter.document_id) selection.document_id = filter.document_id;
  if (filter.worker_id) selection.worker_id = filter.worker_id;
  return selection;
}

function renderBulk(view) {
  const box = $("bulk");
  const filter = view.filter;
  if (!filtered(filter)) {
    fill(box, el("p", { class: "muted" }, "Choose a status or search to act on every matching job."));
    return;
  }
  const blocker = adminBlocker();
  const buttons = ["cancel", "retry"].map((action) => {
    const applies = !filter.status || state.config.actions[action].includes(filter.status);
    const why = blocker || (applies ? null : `${capitalized(filter.status)} jobs cannot be ${action === "cancel" ? "cancelled" : "retried"}.`);
    return actionButton(`${action === "cancel" ? "Cancel" : "Retry"} all matching`, () => bulk(view, action), { blocker: why, kind: "danger" });
  });
  fill(box, ...buttons);
}

/** Bulk: the dry run's count first, then the action, a batch a call, while
 *  the API says more match. */
async function bulk(view, action) {
  const verb = action === "cancel" ? "cancelled" : "retried";
  const filter = bulkFilter(view.filter);
  const box = modal(`${action === "cancel" ? "Cancel" : "Retry"} all matching jobs?`);
  const summary = el("p", { id: "bulk-summary", "aria-live": "polite" }, "Counting the matching jobs (dry run)…");
  box.content.append(summary, el("p", { class: "muted" }, "Filter: ", describeFilter(view.filter)));
  box.actions.append(el("button", { type: "button", onclick: () => box.close() }, "Close"));
  let preview;
  try {
    preview = (await api("extraction-jobs/bulk", { method: "POST", body: { action, filter, dry_run: true } })).data;
  } catch (error) {
    summary.textContent = "";
    box.fail(error.message);
    return;
  }
  const limits = state.config.limits;
  const atLeast = preview.matched >= limits.bulk_count_cap ? "at least " : "";
  if (preview.matched === 0) {
    summary.textContent = `No matching job can be ${verb}.`;
    return;
  }
  summary.textContent = `${atLeast}${count(preview.matched)} matching job(s) would be ${verb}${preview.more ? `, ${count(limits.bulk_batch)} a call` : ""}.`;
  if (action === "cancel") box.content.append(...reasonField("bulk-reason"));
  let stopped = false;
  const confirm = el("button", { type: "button", class: "danger", id: "confirm" }, `${action === "cancel" ? "Cancel" : "Retry"} ${atLeast}${count(preview.matched)} job(s)`);
  const stop = el("button", { type: "button", hidden: true, onclick: () => { stopped = true; } }, "Stop");
  confirm.addEventListener("click", async () => {
    const reason = action === "cancel" ? $("bulk-reason").value.trim() : "";
    const body = { action, filter, dry_run: false, ...(reason ? { reason } : {}) };
    confirm.disabled = true;
    stop.hidden = false;
    box.busy = true;
    let changed = 0;
    try {
      for (;;) {
        const outcome = (await api("extraction-jobs/bulk", { method: "POST", body })).data;
        changed += outcome.changed;
        summary.textContent = `${count(changed)} job(s) ${verb}${outcome.more ? "; going on…" : "."}`;
        if (!outcome.more) break;
        if (stopped || outcome.changed === 0) {
          summary.textContent += outcome.changed === 0 ? " The rest are busy right now: run it again later." : " Stopped; more still match.";
          break;
        }
      }
    } catch (error) {
      box.fail(`${count(changed)} job(s) ${verb}, then: ${error.message}`);
    } finally {
      box.busy = false;
      stop.hidden = true;
      refreshView();
    }
  });
  box.actions.prepend(confirm, stop);
  confirm.focus();
}

function describeFilter(filter) {
  const parts = [];
  if (filter.status) parts.push(`status ${filter.status}`);
  if (filter.document_id) parts.push(`document id ${filter.document_id}`);
  if (filter.worker_id) parts.push(`worker id ${filter.worker_id}`);
  return parts.join(", ");
}

// --- A job's page ------------------------------------------------------------------

function showJob(id) {
  const view = { kind: "job", id, job: null, events: [], after: 0, more: false };
  state.view = UUID.test(id) ? view : { kind: "missing" };
  if (!UUID.test(id)) {
    fill($("main"), el("h1", {}, "No such job"), el("p", {}, "That is not a job id: ", el("code", {}, id)), el("a", { href: "#/" }, "All jobs"));
    return;
  }
  fill($("main"), 
    el("p", {}, el("a", { href: "#/", class: "back" }, "← All jobs")),
    el("h1", { id: "job-title" }, "Job"),
    el("div", { id: "job-actions", class: "bulk" }),
    el("section", { "aria-labelledby": "fields-title" }, el("h2", { id: "fields-title" }, "Fields"), el("dl", { id: "fields", class: "fields" })),
    el("section", { "aria-labelledby": "history-title" },
      el("h2", { id: "history-title" }, "History"),
      el("ol", { id: "timeline", class: "timeline" }),
      el("button", { type: "button", id: "more-events", hidden: true, onclick: () => inTurn(view, () => loadEvents(view).then(() => renderTimeline(view)).catch(failed)) }, "More events"),
    ),
  );
  refreshView();
}

async function refreshJob(view) {
  const { data: job } = await api(jobPath(view.id));
  if (view !== state.view) return;
  view.job = job;
  renderJob(view);
  await loadEvents(view);
  if (view === state.view) renderTimeline(view);
}

/** The next pages of the history (oldest first), following the Link header. */
async function loadEvents(view) {
  for (let pages = 0; pages < EVENT_PAGES_PER_LOAD; pages += 1) {
    const query = new URLSearchParams({ limit: String(EVENTS_PAGE), after: String(view.after) });
    const { data, next } = await api(`${jobPath(view.id)}/events?${query}`);
    if (view !== state.view) return;
    view.events.push(...data);
    if (data.length) view.after = data[data.length - 1].id;
    view.more = Boolean(next);
    if (!next) return;
    view.after = Number(next.get("after"));
  }
}

function formatJson(value) {
  return el("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

function fieldValue(name, value) {
  if (value === null) return el("span", { class: "muted" }, "null");
  if (typeof value === "object") return formatJson(value);
  if (name.endsWith("_at") && typeof value === "string") return [el("span", { class: "mono" }, value), " (", when(value), ")"];
  if (name === "status") return statusBadge(value);
  return el("span", { class: "mono" }, String(value));
}

function renderJob(view) {
  const job = view.job;
  fill($("job-title"), el("span", { class: "doc" }, job.document_id), " ", statusBadge(job.status));
  document.title = `${job.document_id} · Extraction jobs`;
  fill($("fields"), 
    ...Object.entries(job).flatMap(([name, value]) => [
      el("dt", {}, name),
      el("dd", { "data-field": name }, fieldValue(name, value)),
    ]),
  );
  const blocker = adminBlocker();
  const allowed = ["cancel", "retry"].filter((action) => state.config.actions[action].includes(job.status));
  const box = $("job-actions");
  fill(box, 
    ...allowed.map((action) => actionButton(
      action === "cancel" ? "Cancel job" : "Retry job",
      () => confirmAction(job, action),
      { kind: "danger", blocker },
    )),
    allowed.length ? null : el("p", { class: "muted" }, `No action applies to a ${job.status} job.`),
    job.cancel_requested_at && job.status === "processing"
      ? el("p", { class: "muted" }, "Cancel requested ", when(job.cancel_requested_at), ": the worker has yet to stop.")
      : null,
  );
}

const DETAIL_LABELS = { lease_expires_at: "lease expires", run_at: "runs at", error_message: "error" };

function renderTimeline(view) {
  const items = view.events.map((event) => {
    const facts = [
      ["actor", event.actor ?? "—"],
      ["worker", event.worker_id ?? "—"],
    ];
    for (const [name, value] of Object.entries(event.detail || {})) facts.push([DETAIL_LABELS[name] || name.replace(/_/g, " "), value, name]);
    return el(
      "li",
      { class: `event event-${event.type}`, "data-event-id": event.id },
      el("div", { class: "event-head" },
        el("strong", { class: "event-type" }, event.type.replace(/_/g, " ")),
        event.from_status || event.to_status ? el("span", { class: "move" }, ` ${event.from_status ?? "—"} → ${event.to_status ?? "—"}`) : null,
        " ",
        el("span", { class: "muted" }, el("span", { class: "mono" }, event.at), " (", when(event.at), ")"),
      ),
      el("dl", { class: "facts" }, facts.flatMap(([label, value, name]) => [
        el("dt", {}, label),
        el("dd", {}, name?.endsWith("_at") && typeof value === "string" ? [el("span", { class: "mono" }, value), " (", when(value), ")"] : typeof value === "object" && value !== null ? formatJson(value) : String(value)),
      ])),
    );
  });
  fill($("timeline"), ...items);
  if (!items.length) $("timeline").append(el("li", { class: "muted" }, "No events."));
  $("more-events").hidden = !view.more;
}

// --- Start -----------------------------------------------------------------------

async function start() {
  $("notice-close").addEventListener("click", clearNotice);
  $("refresh-toggle").addEventListener("click", togglePause);
  $("refresh-now").addEventListener("click", () => refreshView());
  try {
    const response = await fetch("console/config.json", { cache: "no-store", credentials: "omit" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    state.config = await response.json();
  } catch (error) {
    fill($("main"), el("p", { class: "error" }, `The console's configuration cannot be loaded: ${error.message}`));
    return;
  }
  if (state.config.auth_enabled) {
    await finishAuth0SignIn();
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved && !state.token && !useToken(saved)) sessionStorage.removeItem(TOKEN_KEY);
  }
  renderSession();
  window.addEventListener("hashchange", () => {
    clearNotice();
    route();
    // Keyboard and screen-reader users start again at the new view.
    $("main").focus({ preventScroll: true });
  });
  setInterval(tick, REFRESH_MS);
  route();
}

start();
