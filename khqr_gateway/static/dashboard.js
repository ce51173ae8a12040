// The /queue dashboard: reads the API with the key kept in sessionStorage; data only as text.
"use strict";
(() => {
  const KEY = "khqr-gateway-api-key";
  const $ = (id) => document.getElementById(id);
  let timer = null;

  async function api(path, options = {}) {
    const key = sessionStorage.getItem(KEY);
    const auth = key ? { Authorization: "Bearer " + key } : {};
    const resp = await fetch(path, { ...options, headers: { ...auth, ...(options.headers || {}) } });
    if (resp.status === 401) throw refused(key !== null);
    const body = await resp.json();
    if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
    return body;
  }

  // A 401 before any key was given is how the page learns that it must ask for one: it
  // asks, with no error. A key given and refused is said so, and forgotten.
  function refused(given) {
    sessionStorage.removeItem(KEY);
    showLogin();
    const err = new Error(given ? "That API key was refused: check it and try again." : "");
    err.quiet = !given;
    return err;
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text == null ? "" : String(text);
    if (className) td.className = className;
    return td;
  }

  function time(value) {
    return value ? new Date(value).toLocaleString() : "";
  }

  function fill(tableId, rows, render, columns) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren();
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = cell("Nothing here.", "empty");
      td.colSpan = columns;
      tr.append(td);
      body.append(tr);
      return;
    }
    for (const row of rows) body.append(render(row));
  }

  function card(label, value) {
    const div = document.createElement("div");
    div.className = "card";
    const v = document.createElement("div");
    v.className = "value";
    v.textContent = String(value);
    const l = document.createElement("div");
    l.className = "label";
    l.textContent = label;
    div.append(v, l);
    return div;
  }

  function renderCards(stats) {
    const t = stats.transactions || {};
    const d = stats.deliveries || {};
    const q = stats.queues || {};
    $("cards").replaceChildren(
      card("pending", t.pending || 0),
      card("paid", t.success || 0),
      card("failed / timeout", (t.failed || 0) + (t.timeout || 0)),
      card("mismatch", t.mismatch || 0),
      card("paid late", (stats.latePayments || {}).success || 0),
      card("webhooks delivered", d.delivered || 0),
      card("webhooks failed", d.failed || 0),
      card("poll queue", q.poll || 0),
      card("delivery queue", (q.deliver || 0) + (q.deliver_retry || 0)),
      card("late watch", q.late || 0),
      card("poll lag (s)", stats.pollLagSeconds),
      card("Bakong errors (5 min)", stats.bakong ? stats.bakong.errors : 0),
    );
  }

  function retryButton(delivery) {
    const button = document.createElement("button");
    button.textContent = "Retry";
    button.dataset.delivery = delivery.id;
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api("/api/v1/deliveries/" + encodeURIComponent(delivery.id) + "/retry", { method: "POST" });
        button.textContent = "Queued";
        setTimeout(refresh, 1000);
      } catch (err) {
        showError(err);
        button.disabled = false;
      }
    });
    const td = document.createElement("td");
    td.append(button);
    return td;
  }

  function deliveryRow(d) {
    const tr = document.createElement("tr");
    const answer = d.lastStatusCode != null ? "HTTP " + d.lastStatusCode : (d.lastError || "");
    tr.append(cell(d.id, "mono"), cell(d.jobId, "mono"), cell(d.attemptCount),
      cell(answer), cell(time(d.updatedAt || d.createdAt)), retryButton(d));
    return tr;
  }

  function pendingRow(t) {
    const tr = document.createElement("tr");
    tr.append(cell(t.jobId, "mono"), cell(t.md5, "mono"), cell(time(t.createdAt)),
      cell(time(t.deadlineAt)), cell(t.metadata == null ? "" : JSON.stringify(t.metadata), "mono"));
    return tr;
  }

  function recentRow(t) {
    const tr = document.createElement("tr");
    const hook = t.delivery ? t.delivery.status + " (" + t.delivery.attempts + ")" : "";
    const status = t.late ? t.status + " (late, was " + t.previousStatus + ")" : t.status;
    tr.append(cell(t.jobId, "mono"), cell(t.md5, "mono"), cell(status, "status-" + t.status),
      cell(t.reason), cell(hook, t.delivery ? "status-" + t.delivery.status : ""), cell(time(t.updatedAt)));
    return tr;
  }

  async function refresh() {
    try {
      const [stats, failed, pending, recent] = await Promise.all([
        api("/api/v1/stats"),
        api("/api/v1/deliveries?status=failed&limit=50").catch(() => ({ data: [] })),
        api("/api/v1/transactions?status=pending&limit=50"),
        api("/api/v1/transactions?limit=50"),
      ]);
      renderCards(stats);
      fill("failed", failed.data || [], deliveryRow, 6);
      fill("pending", pending.data, pendingRow, 5);
      fill("recent", recent.data, recentRow, 6);
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      $("error").hidden = true;
      $("main").hidden = false;
      $("login").hidden = true;
      $("logout").hidden = !sessionStorage.getItem(KEY);
    } catch (err) {
      showError(err);
    }
  }

  function showError(err) {
    if (err.quiet) return;
    $("error").textContent = err.message;
    $("error").hidden = false;
  }

  function showLogin() {
    $("main").hidden = true;
    $("login").hidden = false;
    clearInterval(timer);
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    $("error").hidden = true;
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    start();
  });
  $("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(); });

  function start() {
    refresh();
    clearInterval(timer);
    timer = setInterval(refresh, 3000);
  }

  start();
})();
