// The hosted payment page: countdown, live status (Server-Sent Events), "Save QR image" (a
// PNG of the KHQR card, drawn here so that the server draws nothing more) and, in sandbox
// mode, buttons that pay or fail the QR in the simulated Bakong.
(function () {
  "use strict";
  var root = document.getElementById("checkout");
  if (!root) return;
  var statusEl = document.getElementById("status");
  var remainingEl = document.getElementById("remaining");
  var expires = Number(root.getAttribute("data-expires"));
  var framed = window.parent !== window;
  // The server's words in the page's language (the same catalogue it renders with).
  var WORDS = {};
  try { WORDS = JSON.parse(root.getAttribute("data-text") || "{}"); } catch (e) { /* none */ }
  var KHQR_RED = "#E1232E";
  var source = null;
  var timer = null;
  var finished = false;

  // Functions, not strings, as replacements: a `$&` in a name stays as written.
  function say(key, values) {
    return (WORDS[key] || "").replace(/\{(\w+)\}/g, function (all, name) {
      return values && Object.prototype.hasOwnProperty.call(values, name) ? values[name] : all;
    });
  }

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

  function merchant() { return text("merchant") || say("the_merchant"); }

  function reference() { return document.getElementById("next").getAttribute("data-ref"); }

  // A final page shows no QR at all: a paid, expired or mismatched QR must not be scanned.
  function finish(status) {
    var payable = document.getElementById("payable");
    if (!payable) return;  // rendered final by the server, receipt included
    payable.remove();
    var line = document.createElement(status === "success" ? "ul" : "p");
    if (status === "success") {
      line.className = "receipt";
      line.id = "receipt";
      var when = new Date().toLocaleString(root.getAttribute("data-lang") === "km" ? "km-KH" : "en-GB",
        { timeZone: "Asia/Phnom_Penh", dateStyle: "medium", timeStyle: "short" });
      [say("receipt_to", { amount: text("amount"), merchant: merchant() }),
        when + " " + say("phnom_penh"), say("reference") + " " + reference()]
        .forEach(function (t) {
          var li = document.createElement("li");
          li.textContent = t;
          line.appendChild(li);
        });
    } else {
      line.textContent = say("next." + status, { merchant: merchant(), reference: reference() });
    }
    document.getElementById("next").replaceChildren(line);
  }

  function show(status) {
    if (finished || typeof status !== "string") return;
    root.setAttribute("data-status", status);
    statusEl.textContent = say("status." + status) || status;
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

  // Shrink the font until `line` fits `width` (a long merchant name).
  function fit(ctx, line, size, weight, width) {
    do {
      ctx.font = weight + " " + size + "px system-ui, sans-serif";
      size -= 2;
    } while (size > 12 && ctx.measureText(line).width > width);
  }

  // The KHQR card as a PNG-ready canvas: red KHQR header, merchant, amount, a dashed rule,
  // the QR (its own quiet zone kept, drawn from the page's SVG path) and a line on how.
  function card() {
    var svg = document.querySelector("#qr svg");
    var path = svg && svg.querySelector("path");
    if (!path || !window.Path2D) return null;
    var modules = svg.viewBox.baseVal.width;
    var W = 720, H = 1044, scale = Math.floor(560 / modules), size = modules * scale;
    var canvas = document.createElement("canvas");
    canvas.width = W;
    canvas.height = H;
    var ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, W, H);
    ctx.fillStyle = KHQR_RED;
    ctx.fillRect(0, 0, W, 130);
    ctx.beginPath();  // the card's folded corner, as on KHQR stickers
    ctx.moveTo(W - 70, 130); ctx.lineTo(W, 130); ctx.lineTo(W, 200); ctx.closePath(); ctx.fill();
    ctx.fillStyle = "#fff";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.font = "bold 64px system-ui, sans-serif";
    ctx.fillText("KHQR", W / 2, 66);
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    ctx.fillStyle = "#1d2330";
    fit(ctx, merchant(), 34, "", W - 150);
    ctx.fillText(merchant(), 60, 200);
    var amount = document.getElementById("amount");
    var number = amount.firstChild ? amount.firstChild.textContent.trim() : "";
    fit(ctx, number, 72, "bold", W - 260);
    ctx.fillText(number, 60, 282);
    var after = 60 + ctx.measureText(number).width + 14;
    ctx.font = "600 34px system-ui, sans-serif";
    ctx.fillText(text("amount").slice(number.length).trim(), after, 282);
    ctx.setLineDash([14, 10]);
    ctx.strokeStyle = "#9ca3af";
    ctx.lineWidth = 3;
    ctx.beginPath(); ctx.moveTo(0, 326); ctx.lineTo(W, 326); ctx.stroke();
    ctx.setLineDash([]);
    var x = Math.round((W - size) / 2), y = 352;
    ctx.save();
    ctx.translate(x, y);
    ctx.scale(scale, scale);
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 1;
    ctx.stroke(new Path2D(path.getAttribute("d")));
    ctx.restore();
    ctx.fillStyle = "#4b5563";
    ctx.textAlign = "center";
    fit(ctx, text("bill"), 28, "", W - 80);
    ctx.fillText(text("bill"), W / 2, y + size + 44);
    fit(ctx, say("card_scan"), 24, "", W - 80);
    ctx.fillText(say("card_scan"), W / 2, y + size + 86);
    return canvas;
  }

  function download(blob, name) {
    var url = URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
  }

  function told(message) {
    var note = document.getElementById("note");
    if (!note) {
      note = document.createElement("p");
      note.id = "note";
      note.className = "note";
      note.setAttribute("role", "status");
      document.getElementById("save").insertAdjacentElement("afterend", note);
    }
    note.textContent = message;
  }

  // On a phone the share sheet's "Save Image" puts it in the photos, where a bank app's
  // "scan from gallery" looks; elsewhere (or if sharing fails) it is a download.
  function save() {
    var canvas = card();
    if (!canvas) return;
    canvas.toBlob(function (blob) {
      if (!blob) return;
      var name = "khqr-" + reference().replace(/[^A-Za-z0-9_-]+/g, "-") + ".png";
      var file = window.File ? new File([blob], name, { type: "image/png" }) : null;
      var touch = window.matchMedia && window.matchMedia("(pointer: coarse)").matches;
      if (touch && file && navigator.canShare && navigator.canShare({ files: [file] })) {
        navigator.share({ files: [file] }).then(function () { told(say("saved")); }, function (e) {
          if (!e || e.name !== "AbortError") { download(blob, name); told(say("saved")); }
        });
        return;
      }
      download(blob, name);
      told(say("saved"));
    }, "image/png");
  }

  // Sandbox mode: what a payer's app would do, through the simulated Bakong's control routes.
  function simulate(outcome) {
    var box = document.getElementById("sandbox");
    var body = outcome === "pay" ? box.getAttribute("data-pay") : "{}";
    fetch(box.getAttribute("data-control") + "/" + outcome, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: body
    }).then(function (resp) {
      if (!resp.ok) throw new Error("HTTP " + resp.status);
    }).catch(function (e) {
      box.querySelector("p").textContent = say("simulate_error", { error: e.message });
    });
  }

  function offer() {
    var saveButton = document.getElementById("save");
    if (saveButton && window.HTMLCanvasElement && window.Path2D) {
      saveButton.hidden = false;
      saveButton.addEventListener("click", save);
    }
    var link = document.getElementById("deeplink");
    // In sdk.js's modal the Bakong link opens outside the frame, leaving the shop's page.
    if (link && framed) link.target = "_blank";
    var box = document.getElementById("sandbox");
    if (box && window.fetch) {
      box.hidden = false;
      document.getElementById("simulate-pay").addEventListener("click", function () { simulate("pay"); });
      document.getElementById("simulate-fail").addEventListener("click", function () { simulate("fail"); });
    }
  }

  if (framed) document.documentElement.classList.add("framed");
  offer();
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
