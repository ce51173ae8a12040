// The /queue dashboard: reads the API with the key kept in sessionStorage; data only as text.
"use strict";
(() => {
  const KEY = "khqr-gateway-api-key";
  // The app an admin key looks at (sent as Khqr-App); an app's own key sees only its app.
  const APP = "khqr-gateway-app";
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let logins = 0; // times the key form was shown: a refresh begun before one is stale

  async function api(path, options = {}) {
    const key = sessionStorage.getItem(KEY);
    const auth = key ? { Authorization: "Bearer " + key } : {};
    const app = sessionStorage.getItem(APP);
    if (app) auth["Khqr-App"] = app;
    const resp = await fetch(path, { ...options, headers: { ...auth, ...(options.headers || {}) } });
    if (resp.status === 401) throw refused(key);
    const body = await resp.json();
    if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
    return body;
  }

  // A 401 before any key was given is how the page learns that it must ask for one: it
  // asks, with no error. A key given and refused is said so, and forgotten. A 401 to a
  // request sent with another key than the one kept now (or with none, before a key was
  // given: a slow answer of the first refresh) says nothing of the key kept now.
  function refused(sent) {
    const quiet = new Error("");
    quiet.quiet = true;
    if (sessionStorage.getItem(KEY) !== sent) return quiet;
    sessionStorage.removeItem(KEY);
    showLogin();
    if (sent === null) return quiet;
    return new Error("That API key was refused: check it and try again.");
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

  function renderCards(stats, retrying) {
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
      card("webhooks retrying", retrying),
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

  function answerOf(d) {
    const code = d.lastStatusCode != null ? "HTTP " + d.lastStatusCode : "";
    const error = d.lastError || "";
    return [code, error].filter(Boolean).join(" · ");
  }

  function deliveryRow(d) {
    const tr = document.createElement("tr");
    const state = d.status === "pending" ? "retrying" : d.status;
    tr.append(cell(d.id, "mono"), jobCell(d.jobId), cell(state, "status-" + d.status),
      cell(d.attemptCount), cell(answerOf(d)),
      cell(d.status === "pending" ? time(d.nextAttemptAt) : "", "next"), retryButton(d));
    return tr;
  }

  // What was paid once Bakong says, else what the request expects.
  function money(t) {
    const data = t.data || {};
    const expected = t.expected || {};
    return {
      amount: data.amount != null ? data.amount : expected.amount,
      currency: data.currency || expected.currency,
      to: data.toAccountId || expected.toAccountId,
    };
  }

  function jobCell(jobId) {
    const a = document.createElement("a");
    a.href = "#" + jobId;
    a.dataset.job = jobId;
    a.textContent = jobId;
    a.addEventListener("click", (event) => { event.preventDefault(); showDetail(jobId); });
    const td = document.createElement("td");
    td.className = "mono";
    td.append(a);
    return td;
  }

  function pendingRow(t) {
    const tr = document.createElement("tr");
    const m = money(t);
    tr.append(jobCell(t.jobId), cell(m.amount, "num"), cell(m.currency), cell(time(t.createdAt)),
      cell(time(t.deadlineAt)), cell(t.metadata == null ? "" : JSON.stringify(t.metadata), "mono"));
    return tr;
  }

  function recentRow(t) {
    const tr = document.createElement("tr");
    const hook = t.delivery ? t.delivery.status + " (" + t.delivery.attempts + ")" : "";
    const status = t.late ? t.status + " (late, was " + t.previousStatus + ")" : t.status;
    const m = money(t);
    tr.append(jobCell(t.jobId), cell(status, "status-" + t.status), cell(m.amount, "num"),
      cell(m.currency), cell(m.to, "mono"), cell(t.reason),
      cell(hook, t.delivery ? "status-" + t.delivery.status : ""), cell(time(t.updatedAt)));
    return tr;
  }

  const SVG = "http://www.w3.org/2000/svg";

  // Bars drawn as SVG elements with presentation attributes: no markup, no inline style,
  // so the strict CSP holds. `values` are 0..max; `titles` become each bar's tooltip.
  function bars(svgId, values, max, titles, className) {
    const svg = $(svgId);
    const width = 480 / values.length;
    const nodes = values.map((value, i) => {
      const height = max > 0 ? Math.max(value > 0 ? 2 : 0, (value / max) * 100) : 0;
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", String(i * width + 1));
      rect.setAttribute("y", String(110 - height));
      rect.setAttribute("width", String(Math.max(1, width - 2)));
      rect.setAttribute("height", String(height));
      rect.setAttribute("class", className);
      const title = document.createElementNS(SVG, "title");
      title.textContent = titles[i];
      rect.append(title);
      return rect;
    });
    const axis = document.createElementNS(SVG, "line");
    axis.setAttribute("x1", "0"); axis.setAttribute("x2", "480");
    axis.setAttribute("y1", "110"); axis.setAttribute("y2", "110");
    axis.setAttribute("class", "axis");
    svg.replaceChildren(axis, ...nodes);
  }

  function renderCharts(hours) {
    const label = (h) => new Date(h.hour).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    const paid = hours.map((h) => h.paid + h.mismatch);
    bars("chart-paid", paid, Math.max(1, ...paid),
      hours.map((h) => label(h) + ": " + h.paid + " paid, " + h.mismatch + " mismatched"), "bar");
    const rates = hours.map((h) => {
      const made = h.delivered + h.failed + h.retrying;
      return made ? (100 * h.delivered) / made : 0;
    });
    bars("chart-hooks", rates, 100, hours.map((h, i) => label(h) + ": " + rates[i].toFixed(0) +
      "% delivered (" + h.delivered + " of " + (h.delivered + h.failed + h.retrying) + ")"), "bar hooks");
    // null: no gateway process ran that hour, which is not the same as no lag.
    const lags = hours.map((h) => h.pollLagSeconds == null ? 0 : h.pollLagSeconds);
    bars("chart-lag", lags, Math.max(1, ...lags), hours.map((h) => label(h) + ": " +
      (h.pollLagSeconds == null ? "no gateway running" : "poll lag up to " +
        h.pollLagSeconds.toFixed(1) + " s")), "bar lag");
    $("lag-peak").textContent = "(peak " + Math.max(0, ...lags).toFixed(1) + " s)";
  }

  function listQuery() {
    const params = new URLSearchParams({ limit: "50" });
    const q = $("q").value.trim();
    if (q) params.set("q", q);
    if ($("status").value) params.set("status", $("status").value);
    if ($("since").value) {
      params.set("since", new Date(Date.now() - Number($("since").value)).toISOString());
    }
    return "/api/v1/transactions?" + params.toString();
  }

  function field(list, name, value) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value == null ? "" : String(value);
    list.append(dt, dd);
  }

  function attemptRow(deliveryId, a) {
    const tr = document.createElement("tr");
    const code = a.statusCode != null ? "HTTP " + a.statusCode : "";
    const answer = [code, a.errorKind, a.errorMessage].filter(Boolean).join(" · ");
    tr.append(cell(deliveryId, "mono"), cell(a.attempt), cell(time(a.startedAt)), cell(answer),
      cell(a.durationMs));
    return tr;
  }

  async function showDetail(jobId) {
    try {
      const path = encodeURIComponent(jobId);
      const [t, deliveries] = await Promise.all([
        api("/api/v1/transactions/" + path),
        api("/api/v1/deliveries?jobId=" + path + "&limit=20"),
      ]);
      const full = await Promise.all(
        deliveries.data.map((d) => api("/api/v1/deliveries/" + encodeURIComponent(d.id))));
      $("detail-job").textContent = t.jobId;
      const list = $("detail-fields");
      list.replaceChildren();
      const m = money(t);
      field(list, "Status", t.late ? t.status + " (late, was " + t.previousStatus + ")" : t.status);
      field(list, "Reason", t.reason);
      field(list, "Amount", [m.amount, m.currency].filter((v) => v != null).join(" "));
      field(list, "md5", t.md5);
      field(list, "Webhook URL", t.webhookUrl);
      field(list, "Created", time(t.createdAt));
      field(list, "Completed", time(t.completedAt));
      $("detail-data").textContent = t.data == null ? "none yet" : JSON.stringify(t.data, null, 2);
      $("detail-metadata").textContent = t.metadata == null ? "none" : JSON.stringify(t.metadata, null, 2);
      const rows = [];
      for (const d of full) for (const a of d.attempts || []) rows.push(attemptRow(d.id, a));
      const body = $("detail-attempts").querySelector("tbody");
      body.replaceChildren(...rows);
      if (!rows.length) fill("detail-attempts", [], null, 5);
      $("detail").hidden = false;
      $("detail").scrollIntoView();
    } catch (err) {
      showError(err);
    }
  }

  // An admin key can list the apps: the picker shows them; any other key gets 403 and no
  // picker. Asked once per key, not at every refresh.
  async function loadApps() {
    const picker = $("app-picker");
    const select = $("app");
    const key = sessionStorage.getItem(KEY);
    let page = null;
    if (key) {
      // Not through api(): a 401 or 403 here only means "no admin key", never a login.
      const resp = await fetch("/api/v1/apps?limit=100", {
        headers: { Authorization: "Bearer " + key },
      }).catch(() => null);
      if (resp && resp.ok) page = await resp.json();
    }
    if (!page) {
      picker.hidden = true;
      sessionStorage.removeItem(APP);
      return;
    }
    const chosen = sessionStorage.getItem(APP) || "app_default";
    select.replaceChildren();
    for (const app of page.data || []) {
      const option = document.createElement("option");
      option.value = app.id;
      option.textContent = app.name + (app.disabledAt ? " (disabled)" : "");
      option.selected = app.id === chosen;
      select.append(option);
    }
    picker.hidden = false;
  }

  async function refresh() {
    const asked = logins;
    try {
      const [stats, failed, waiting, pending, recent, hourly] = await Promise.all([
        api("/api/v1/stats"),
        api("/api/v1/deliveries?status=failed&limit=50").catch(() => ({ data: [] })),
        api("/api/v1/deliveries?status=pending&limit=100").catch(() => ({ data: [] })),
        api("/api/v1/transactions?status=pending&limit=50"),
        api(listQuery()),
        api("/api/v1/reports/hourly").catch(() => ({ data: [] })),
      ]);
      // The key form was shown meanwhile ("Use a key"): this answer must not hide it.
      if (asked !== logins) return;
      renderCharts(hourly.data || []);
      // A pending delivery with attempts behind it is one being retried: it needs an eye
      // as much as one that gave up.
      const retrying = (waiting.data || []).filter((d) => d.attemptCount > 0);
      renderCards(stats, retrying.length + (waiting.hasMore ? "+" : ""));
      fill("attention", retrying.concat(failed.data || []), deliveryRow, 7);
      fill("pending", pending.data, pendingRow, 6);
      fill("recent", recent.data, recentRow, 8);
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      $("error").hidden = true;
      $("main").hidden = false;
      $("login").hidden = true;
      $("logout").hidden = !sessionStorage.getItem(KEY);
      // Open without a key (no API_KEY): an admin still gives one, for the app picker.
      $("use-key").hidden = !!sessionStorage.getItem(KEY);
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
    logins += 1;
    $("use-key").hidden = true;
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
  $("use-key").addEventListener("click", showLogin);
  $("filters").addEventListener("submit", (event) => { event.preventDefault(); refresh(); });
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(APP);
    $("app-picker").hidden = true;
    showLogin();
  });
  $("app").addEventListener("change", () => {
    sessionStorage.setItem(APP, $("app").value);
    refresh();
  });

  function start() {
    loadApps();
    refresh();
    clearInterval(timer);
    timer = setInterval(refresh, 3000);
  }

  start();
})();
