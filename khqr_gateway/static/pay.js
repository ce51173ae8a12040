// The hosted payment page: countdown to expiry and live status through Server-Sent Events.
(function () {
  "use strict";
  var root = document.getElementById("checkout");
  if (!root) return;
  var statusEl = document.getElementById("status");
  var remainingEl = document.getElementById("remaining");
  var expires = Number(root.getAttribute("data-expires"));
  var framed = window.parent !== window;
  var TEXT = {
    pending: "Waiting for payment\u2026",
    success: "Paid. Thank you!",
    failed: "The payment failed",
    timeout: "This QR code has expired",
    mismatch: "The payment did not match this request",
    cancelled: "This payment was cancelled"
  };
  // What to do next once final (the server renders the same on a final page, with Bakong's
  // time and hash on the receipt).
  var NEXT = {
    failed: "Bakong reports this payment as failed. To pay, ask {merchant} for a new QR code.",
    timeout: "This QR code can no longer be paid. To pay, ask {merchant} for a new one.",
    mismatch: "Your payment did not match this request (amount, currency or account). " +
      "Please contact {merchant}, quoting reference {reference}.",
    cancelled: "{merchant} cancelled this payment. Ask them for a new QR code if you " +
      "still want to pay."
  };
  var source = null;
  var timer = null;
  var finished = false;

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function countdown() {
    var left = Math.max(0, Math.round((expires - Date.now()) / 1000));
    remainingEl.textContent = pad(Math.floor(left / 60)) + ":" + pad(left % 60);
  }

  // Tell the embedding page (sdk.js) the outcome; only the status and jobId, never the token.
  function notify(status) {
    if (!framed) return;
    var target = "*";
    try { if (document.referrer) target = new URL(document.referrer).origin; } catch (e) { /* keep * */ }
    window.parent.postMessage(
      { type: "khqr:status", status: status, jobId: root.getAttribute("data-job") }, target);
  }

  function text(id) {
    var el = document.getElementById(id);
    return el ? el.textContent.replace(/\s+/g, " ").trim() : "";
  }

  // A final page shows no QR at all: a paid, expired or mismatched QR must not be scanned.
  function finish(status) {
    var qr = document.getElementById("qr");
    if (!qr) return;  // rendered final by the server, receipt included
    qr.remove();
    var next = document.getElementById("next");
    var merchant = text("merchant") || "the merchant";
    var reference = next.getAttribute("data-ref");
    var line = document.createElement(status === "success" ? "ul" : "p");
    if (status === "success") {
      line.className = "receipt";
      line.id = "receipt";
      var when = new Date().toLocaleString("en-GB", { timeZone: "Asia/Phnom_Penh",
        dateStyle: "medium", timeStyle: "short" }) + " (Phnom Penh)";
      [text("amount") + " to " + merchant, when, "Reference " + reference]
        .forEach(function (t) {
          var li = document.createElement("li");
          li.textContent = t;
          line.appendChild(li);
        });
    } else {
      // Functions, not strings, as replacements: a `$&` in a name stays as written.
      line.textContent = (NEXT[status] || "").replace("{merchant}", function () { return merchant; })
        .replace("{reference}", function () { return reference; });
    }
    next.replaceChildren(line);
  }

  function show(status) {
    if (finished || typeof status !== "string") return;
    root.setAttribute("data-status", status);
    statusEl.textContent = TEXT[status] || status;
    if (status === "pending") return;
    finished = true;
    finish(status);
    if (source) source.close();
    if (timer) clearInterval(timer);
    notify(status);
    var back = root.getAttribute("data-return");
    if (status === "success" && back && !framed) {
      setTimeout(function () { window.location.assign(back); }, 1500);
    }
  }

  countdown();
  timer = setInterval(countdown, 1000);
  var initial = root.getAttribute("data-status");
  if (initial !== "pending") { show(initial); return; }
  if (!window.EventSource) return;
  var wait = 5000;
  function listen() {
    source = new EventSource(root.getAttribute("data-events"));
    source.onopen = function () { wait = 5000; };
    source.onmessage = function (event) {
      try { show(JSON.parse(event.data).status); } catch (e) { /* not ours */ }
    };
    // A refused stream (429 or 503: this link or the process is at its limit) is closed
    // for good by the browser: ask again later, so that the page still turns paid.
    source.onerror = function () {
      if (finished || source.readyState !== EventSource.CLOSED) return;
      setTimeout(listen, wait);
      wait = Math.min(wait * 2, 60000);
    };
  }
  listen();
})();
