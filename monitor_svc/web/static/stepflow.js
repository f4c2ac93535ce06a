// stepflow's web view: the job list and a job's page, kept live by one Server-Sent Events
// stream each. No build step and no library: what the browser has is enough.
//
// The stream is read with fetch (not EventSource) so that the page hears the server's pings
// (it can tell a dead connection from a quiet one), sends Last-Event-ID itself on every
// reconnect, and learns of a lost login (401) instead of retrying forever.
"use strict";

const PING_SILENCE_MS = 40000; // the server pings every 15 s; this long without a byte is a dead stream
const RETRY_MIN_MS = 250;
const RETRY_MAX_MS = 5000;
const LOG_DOM_MAX = 10000; // lines kept on the page while following; older ones are paged back
const EARLIER_PAGE = 1000;
const TERMINAL = new Set(["completed", "failed", "cancelled", "skipped"]);

const $ = (selector, root = document) => root.querySelector(selector);
const statusWord = (s) => (s || "JOB_STATUS_UNSPECIFIED").replace("JOB_STATUS_", "").toLowerCase();
const num = (v) => Number(v || 0);

function toLogin() {
  location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

// Local time, as a log prints it: 2026-12-08 14:03:07, or 14:03:07.123 for a log line.
function formatTime(iso, withDate = true) {
  if (!iso) return "–";
  const d = new Date(iso);
  const time = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  if (!withDate) return time + "." + pad(d.getMilliseconds(), 3);
  return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + time;
}

function formatDuration(startIso, endIso) {
  if (!startIso) return "–";
  const ms = (endIso ? new Date(endIso) : new Date()) - new Date(startIso);
  if (ms < 0) return "–";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + Math.floor(s % 60) + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}

function statusBadge(status) {
  const span = document.createElement("span");
  span.className = "status s-" + status;
  span.textContent = status;
  return span;
}

// ---- the freshness badge ---------------------------------------------------------------
function setFresh(state) {
  const badge = $("[data-live]");
  badge.textContent = state;
  badge.dataset.state = state;
}

// A browser gives one site about six HTTP/1.1 connections: a tab in the background gives its
// stream back, and resumes it exactly (Last-Event-ID) when it is shown again.
function whenVisible() {
  if (!document.hidden) return Promise.resolve();
  return new Promise((resolve) => {
    const shown = () => {
      if (document.hidden) return;
      document.removeEventListener("visibilitychange", shown);
      resolve();
    };
    document.addEventListener("visibilitychange", shown);
  });
}

// ---- one SSE stream, resumed by id across every break ---------------------------------
// onEvent(name, data, id) for each event; resolves when the server sends `end`.
async function follow(url, onEvent) {
  let lastId = "";
  let delay = RETRY_MIN_MS;
  for (;;) {
    await whenVisible();
    const abort = new AbortController();
    let heard = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - heard > PING_SILENCE_MS) abort.abort();
    }, 1000);
    const hidden = () => { if (document.hidden) abort.abort(); };
    document.addEventListener("visibilitychange", hidden);
    let ended = false;
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await fetch(url, {
        headers, cache: "no-store", credentials: "same-origin", signal: abort.signal,
      });
      if (response.status === 401) { toLogin(); return; }
      if (response.status === 404) { onEvent("missing", await response.json(), null); return; }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        heard = Date.now();
        if (document.body.dataset.fresh !== "live") { setFresh("live"); document.body.dataset.fresh = "live"; }
        delay = RETRY_MIN_MS;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          let name = "message", data = [], id = null;
          for (const line of block.split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") name = text;
            else if (field === "data") data.push(text);
            else if (field === "id") id = text;
          }
          if (!data.length) continue;
          onEvent(name, JSON.parse(data.join("\n")), id);
          if (id !== null) lastId = id;
          if (name === "end") ended = true;
        }
      }
    } catch (err) {
      // A broken or refused connection: reconnect below.
    } finally {
      clearInterval(watchdog);
      document.removeEventListener("visibilitychange", hidden);
    }
    if (ended) return;
    if (document.hidden) continue; // given back on purpose: resume as soon as it is shown
    document.body.dataset.fresh = "reconnecting";
    setFresh("reconnecting");
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, RETRY_MAX_MS);
  }
}

async function getJson(url, options = {}) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store", ...options });
  if (response.status === 401) { toLogin(); throw new Error("signed out"); }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
  return body;
}

// ---- the job list -----------------------------------------------------------------------
function listPage() {
  const select = $("[data-list-status]");
  const params = new URLSearchParams(location.search);
  select.value = params.get("status") || "";
  let generation = 0;
  const start = () => {
    const mine = ++generation;
    const query = select.value ? "?status=" + encodeURIComponent(select.value) : "";
    follow("/api/v1/managers/events" + query, (name, page) => {
      if (name === "jobs" && mine === generation) renderList(page, false);
    });
  };
  $("[data-list-more]").addEventListener("click", () => olderJobs(select.value));
  select.addEventListener("change", () => {
    const url = new URL(location.href);
    if (select.value) url.searchParams.set("status", select.value);
    else url.searchParams.delete("status");
    history.replaceState(null, "", url);
    location.reload();
  });
  start();
}

function listRow(job) {
  const tr = document.createElement("tr");
  const status = statusWord(job.status);
  const steps = job.stepStats || [];
  const done = steps.filter((s) => TERMINAL.has(statusWord(s.status))).length;
  tr.dataset.jobId = job.id;
  tr.dataset.status = status;
  const link = document.createElement("a");
  link.href = "/jobs/" + encodeURIComponent(job.id);
  link.textContent = job.name || job.id;
  const cells = [link, status, done + " / " + steps.length, job.owner || "–",
    formatTime(job.createdAt), formatDuration(job.startedAt, job.finishedAt)];
  for (const [i, value] of cells.entries()) {
    const td = document.createElement("td");
    if (i === 1) td.append(statusBadge(status));
    else if (value instanceof Node) td.append(value);
    else td.textContent = value;
    tr.append(td);
  }
  return tr;
}

// The newest page is live; older pages are loaded on demand below it (not live).
function renderList(listing, older) {
  const jobs = listing.jobs || [];
  const body = older ? $("[data-jobs-older]") : $("[data-jobs]");
  if (older) body.append(...jobs.map(listRow));
  else body.replaceChildren(...jobs.map(listRow));
  const more = $("[data-list-more]");
  if (!older && !more.dataset.loaded) more.dataset.token = listing.nextPageToken || "";
  if (older) more.dataset.token = listing.nextPageToken || "";
  more.hidden = !more.dataset.token;
  $("[data-jobs-empty]").hidden = $("[data-jobs]").childElementCount > 0;
}

async function olderJobs(status) {
  const more = $("[data-list-more]");
  const q = new URLSearchParams({ page_token: more.dataset.token || "" });
  if (status) q.set("status", status);
  more.dataset.loaded = "1";
  renderList(await getJson("/api/v1/jobs?" + q), true);
}

// ---- a job's page -------------------------------------------------------------------------
function jobPage() {
  const jobId = decodeURIComponent(location.pathname.split("/").pop());
  const page = {
    jobId, shown: -1, lastLogSeq: 0, firstLogSeq: 0, steps: new Map(), stepJobs: new Map(),
    stepStatuses: "", job: null, stepNames: new Map(),
  };
  document.title = "stepflow · " + jobId;
  $("[data-job-id]").textContent = jobId;
  $("[data-cancel]").addEventListener("click", () => cancel(page));
  $("[data-log-filter]").addEventListener("change", () => filterLog());
  $("[data-log-earlier]").addEventListener("click", () => earlier(page));
  setInterval(() => tickDurations(page), 1000);
  follow("/api/v1/jobs/" + encodeURIComponent(jobId) + "/events", (name, data) => {
    if (name === "state") applyState(page, data);
    else if (name === "log") addLines(page, [data], false);
    else if (name === "end") document.body.dataset.ended = "1";
    else if (name === "missing") {
      $("[data-job-name]").textContent = "No such job";
      $("[data-job-status]").textContent = "not found";
      $("[data-job-error]").textContent = data.error || "";
      $("[data-job-error]").hidden = false;
      document.body.dataset.missing = "1";
    }
  }).then(() => setFresh(document.body.dataset.missing ? "not found" : "live"));
}

function applyState(page, job) {
  const seq = num(job.changeSeq);
  if (seq <= page.shown) return; // never an older state than one shown
  page.shown = seq;
  page.job = job;
  const status = statusWord(job.status);
  const live = $("[data-live]");
  live.dataset.changeSeq = String(seq);
  $("[data-seq-text]").textContent = "change " + seq;
  $("[data-job-name]").textContent = job.name || job.id;
  document.title = "stepflow · " + (job.name || job.id) + " · " + status;
  const statusEl = $("[data-job-status]");
  statusEl.textContent = status;
  statusEl.className = "status s-" + status;
  const error = $("[data-job-error]");
  error.textContent = job.error ? job.error + (job.endReason ? " (" + job.endReason + ")" : "") : "";
  error.hidden = !job.error;
  $("[data-job-owner]").textContent = job.owner || "–";
  $("[data-job-created]").textContent = formatTime(job.createdAt);
  $("[data-job-started]").textContent = formatTime(job.startedAt);
  $("[data-job-finished]").textContent = formatTime(job.finishedAt);
  $("[data-job-attempt]").textContent = job.attempt || "–";
  $("[data-cancel]").hidden = TERMINAL.has(status);
  tickDurations(page);
  const stats = job.stepStats || [];
  for (const stat of stats) renderStep(page, stat);
  if (!page.rendered) {
    // When the first state is on screen (the next frame): what bench/bench_web.py times.
    page.rendered = true;
    requestAnimationFrame(() => performance.mark("stepflow:first-state"));
  }
  const statuses = stats.map((s) => s.stepId + ":" + s.status).join(",");
  if (statuses !== page.stepStatuses) {
    page.stepStatuses = statuses;
    loadStepJobs(page);
  }
}

function renderStep(page, stat) {
  const index = num(stat.stepIndex);
  let el = page.steps.get(index);
  if (!el) {
    el = $("#step-template").content.firstElementChild.cloneNode(true);
    el.dataset.stepIndex = String(index);
    el.dataset.stepId = stat.stepId || "";
    $(".step-name", el).textContent = stat.stepName || "step " + index;
    $(".step-type", el).textContent = stat.stepType || "";
    const list = $("[data-steps]");
    const after = [...list.children].find((c) => num(c.dataset.stepIndex) > index);
    list.insertBefore(el, after || null);
    page.steps.set(index, el);
    page.stepNames.set(stat.stepId, stat.stepName);
    const option = document.createElement("option");
    option.value = stat.stepId;
    option.textContent = stat.stepName || stat.stepId;
    $("[data-log-step]").append(option);
    wireChildren(page, el, stat.stepId);
    for (const line of document.querySelectorAll('[data-log] [data-step="' + CSS.escape(stat.stepId) + '"]')) {
      $(".where", line).textContent = whereOf(page, line.dataset.step, line.dataset.child);
    }
  }
  const status = statusWord(stat.status);
  el.dataset.status = status;
  const badge = $("[data-step-status]", el);
  badge.textContent = status;
  badge.className = "status s-" + status;
  const c = stat.children || {};
  const counts = {
    pending: num(c.pending), running: num(c.running), completed: num(c.completed),
    failed: num(c.failed), cancelled: num(c.cancelled),
  };
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  const childCount = num(stat.childCount);
  const hasChildren = childCount > 0 || total > 0;
  if (hasChildren) {
    $("[data-counts]", el).hidden = false;
    $("[data-children]", el).hidden = false;
  }
  for (const [name, value] of Object.entries(counts)) $('[data-count="' + name + '"]', el).textContent = String(value);
  $("[data-child-count]", el).textContent = String(Math.max(childCount, total));
  const bar = $("[data-bar]", el);
  const whole = Math.max(childCount, total);
  bar.replaceChildren(...["completed", "failed", "cancelled", "running", "pending"].filter((k) => counts[k] > 0).map((k) => {
    const seg = document.createElement("span");
    seg.className = "seg seg-" + k;
    seg.style.width = (100 * counts[k] / whole) + "%";
    return seg;
  }));
  bar.hidden = !hasChildren;
  bar.setAttribute("aria-label", Object.entries(counts).map(([k, v]) => v + " " + k).join(", "));
  const error = $("[data-step-error]", el);
  error.textContent = stat.error || "";
  error.hidden = !stat.error;
  stepMeta(page, el);
}

async function loadStepJobs(page) {
  try {
    const listing = await getJson("/api/v1/jobs/" + encodeURIComponent(page.jobId) + "/steps");
    for (const step of listing.jobs || []) {
      // Answers may come back out of order: a step's record only ever moves to a newer one.
      const known = page.stepJobs.get(step.id);
      if (!known || num(step.version) >= num(known.version)) page.stepJobs.set(step.id, step);
    }
    for (const el of page.steps.values()) stepMeta(page, el);
  } catch (err) { /* the next change tries again */ }
}

function stepMeta(page, el) {
  const step = page.stepJobs.get(el.dataset.stepId);
  if (!step) return;
  const parts = [];
  if (step.attempt) parts.push("attempt " + step.attempt);
  if (step.startedAt) parts.push(formatDuration(step.startedAt, step.finishedAt));
  if (step.endReason) parts.push(step.endReason);
  $("[data-step-meta]", el).textContent = parts.join(" · ");
}

function tickDurations(page) {
  const job = page.job;
  if (!job) return;
  $("[data-job-duration]").textContent = formatDuration(job.startedAt || job.createdAt, job.finishedAt);
  for (const el of page.steps.values()) {
    if (!TERMINAL.has(el.dataset.status)) stepMeta(page, el);
  }
}

async function cancel(page) {
  const button = $("[data-cancel]");
  const note = $("[data-cancel-note]");
  button.disabled = true;
  note.textContent = "cancelling…";
  try {
    const job = await getJson("/api/v1/jobs/" + encodeURIComponent(page.jobId) + "/cancel", { method: "POST" });
    note.textContent = "";
    applyState(page, job);
  } catch (err) {
    note.textContent = "not cancelled: " + err.message;
  } finally {
    button.disabled = false;
  }
}

// ---- a step's children, paged -------------------------------------------------------------
function wireChildren(page, el, stepId) {
  const details = $("[data-children]", el);
  const select = $("[data-children-status]", el);
  const more = $("[data-children-more]", el);
  let token = "";
  const load = async (fresh) => {
    if (fresh) { token = ""; $("[data-children-rows]", el).replaceChildren(); }
    const q = new URLSearchParams({ step_id: stepId, page_token: token });
    if (select.value) q.set("status", select.value);
    try {
      const listing = await getJson("/api/v1/jobs/" + encodeURIComponent(page.jobId) + "/children?" + q);
      const rows = (listing.jobs || []).map((child) => {
        const tr = document.createElement("tr");
        tr.dataset.childId = child.id;
        const status = statusWord(child.status);
        tr.dataset.status = status;
        if (child.runner) tr.dataset.runner = child.runner;
        for (const [i, value] of [child.name || child.id, status, child.attempt || "–",
          child.runner || "–", formatDuration(child.startedAt, child.finishedAt),
          child.error || ""].entries()) {
          const td = document.createElement("td");
          if (i === 1) td.append(statusBadge(status)); else td.textContent = value;
          tr.append(td);
        }
        return tr;
      });
      $("[data-children-rows]", el).append(...rows);
      token = listing.nextPageToken || "";
      more.hidden = !token;
    } catch (err) { more.hidden = false; }
  };
  details.addEventListener("toggle", () => { if (details.open) load(true); });
  select.addEventListener("change", () => load(true));
  more.addEventListener("click", () => load(false));
}

// ---- the log ------------------------------------------------------------------------------
function whereOf(page, stepId, childId) {
  if (!stepId) return "job";
  const step = page.stepNames.get(stepId) || stepId.slice(0, 8);
  return childId ? step + "/" + childId.slice(-8) : step; // a child id's end tells them apart
}

function lineElement(page, line) {
  const el = document.createElement("div");
  const seq = num(line.seq);
  el.className = "line lvl-" + (line.level || "info") + " src-" + (line.source || "log");
  el.dataset.logSeq = String(seq);
  el.dataset.step = line.stepId || "";
  el.dataset.child = line.childId || "";
  el.dataset.source = line.source || "";
  const time = document.createElement("time");
  time.dateTime = line.time || "";
  time.textContent = formatTime(line.time, false);
  const where = document.createElement("span");
  where.className = "where";
  where.textContent = whereOf(page, line.stepId, line.childId);
  const source = document.createElement("span");
  source.className = "src";
  source.textContent = line.source || "";
  const message = document.createElement("span");
  message.className = "msg";
  message.textContent = (line.message || "") + (line.truncated ? " …[cut]" : "");
  el.append(time, " ", where, " ", source, " ", message);
  el.hidden = !matchesFilter(el);
  return el;
}

function addLines(page, lines, before) {
  const log = $("[data-log]");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  if (before) {
    const fresh = lines.filter((l) => num(l.seq) < page.firstLogSeq || !page.firstLogSeq);
    log.prepend(...fresh.map((l) => lineElement(page, l)));
    if (fresh.length) page.firstLogSeq = num(fresh[0].seq);
  } else {
    const fresh = lines.filter((l) => num(l.seq) > page.lastLogSeq); // never a line twice
    if (!fresh.length) return;
    log.append(...fresh.map((l) => lineElement(page, l)));
    page.lastLogSeq = num(fresh[fresh.length - 1].seq);
    if (!page.firstLogSeq) page.firstLogSeq = num(fresh[0].seq);
    // Lines paged back on purpose stay (up to a larger bound); only the followed tail is cut.
    const bound = page.pagedBack ? LOG_DOM_MAX * 5 : LOG_DOM_MAX;
    while (log.childElementCount > bound) {
      log.firstElementChild.remove();
      page.firstLogSeq = num(log.firstElementChild.dataset.logSeq);
    }
  }
  $("[data-log-earlier]").hidden = page.firstLogSeq <= 1;
  $("[data-log-empty]").hidden = log.childElementCount > 0;
  if (!before && atEnd && $("[data-log-follow]").checked) log.scrollTop = log.scrollHeight;
}

async function earlier(page) {
  const first = page.firstLogSeq;
  if (first <= 1) return;
  const after = Math.max(0, first - 1 - EARLIER_PAGE);
  const url = "/api/v1/jobs/" + encodeURIComponent(page.jobId) + "/log?after_seq=" + after +
    "&limit=" + (first - 1 - after);
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) { toLogin(); return; }
  const text = await response.text();
  const lines = text.split("\n").filter(Boolean).map((t) => JSON.parse(t)).filter((l) => num(l.seq) < first);
  page.pagedBack = true;
  addLines(page, lines, true);
}

function matchesFilter(el) {
  const step = $("[data-log-step]").value;
  const sources = new Set([...document.querySelectorAll('[data-log-filter] input[name="source"]:checked')].map((i) => i.value));
  return (step === "*" || el.dataset.step === step) && sources.has(el.dataset.source);
}

function filterLog() {
  for (const el of $("[data-log]").children) el.hidden = !matchesFilter(el);
}

document.addEventListener("DOMContentLoaded", () => {
  document.body.dataset.fresh = "connecting";
  if (document.body.dataset.page === "list") listPage();
  else if (document.body.dataset.page === "job") jobPage();
});
