/* khqr-gateway checkout: new KhqrCheckout({url, onSuccess, onFailure, onClose}).open()
   shows the hosted payment page in a modal and reports its outcome. No dependencies. */
(function (window) {
  "use strict";

  function css(el, styles) {
    for (var key in styles) el.style[key] = styles[key];
    return el;
  }

  function KhqrCheckout(options) {
    if (!options || !options.url) throw new Error("KhqrCheckout: url is required");
    this.options = options;
    this.url = new URL(options.url, window.location.href);
    this.overlay = null;
    this.frame = null;
    this.result = null;
    this._onMessage = this._onMessage.bind(this);
    this._onKey = this._onKey.bind(this);
  }

  KhqrCheckout.prototype.open = function () {
    if (this.overlay) return this;
    var doc = window.document;
    var overlay = css(doc.createElement("div"), {
      position: "fixed", inset: "0", zIndex: "2147483647", background: "rgba(16,24,40,.6)",
      display: "flex", alignItems: "center", justifyContent: "center"
    });
    overlay.setAttribute("role", "dialog");
    overlay.setAttribute("aria-modal", "true");
    var frame = css(doc.createElement("iframe"), {
      width: "min(380px, 100vw)", height: "min(600px, 100vh)", border: "0",
      borderRadius: "14px", background: "#fff"
    });
    frame.title = "KHQR payment";
    frame.src = this.url.href;
    var close = css(doc.createElement("button"), {
      position: "absolute", top: "12px", right: "16px", font: "28px/1 sans-serif",
      color: "#fff", background: "none", border: "0", cursor: "pointer"
    });
    close.type = "button";
    close.setAttribute("aria-label", "Close");
    close.textContent = "\u00d7";
    close.onclick = this.close.bind(this);
    overlay.appendChild(frame);
    overlay.appendChild(close);
    doc.body.appendChild(overlay);
    this.overlay = overlay;
    this.frame = frame;
    window.addEventListener("message", this._onMessage);
    doc.addEventListener("keydown", this._onKey);
    return this;
  };

  KhqrCheckout.prototype.close = function () {
    if (!this.overlay) return;
    window.removeEventListener("message", this._onMessage);
    window.document.removeEventListener("keydown", this._onKey);
    this.overlay.parentNode.removeChild(this.overlay);
    this.overlay = this.frame = null;
    this._call("onClose", this.result);
  };

  KhqrCheckout.prototype._call = function (name, arg) {
    if (typeof this.options[name] === "function") this.options[name](arg);
  };

  KhqrCheckout.prototype._onMessage = function (event) {
    // Only our page, in our frame, may report an outcome.
    if (!this.frame || event.source !== this.frame.contentWindow) return;
    if (event.origin !== this.url.origin) return;
    var data = event.data;
    if (!data || data.type !== "khqr:status" || this.result) return;
    if (typeof data.status !== "string" || data.status === "pending") return;
    this.result = { status: data.status, jobId: data.jobId };
    this._call(data.status === "success" ? "onSuccess" : "onFailure", this.result);
    var delay = this.options.autoCloseMs;
    if (delay !== false) setTimeout(this.close.bind(this), delay == null ? 2000 : delay);
  };

  KhqrCheckout.prototype._onKey = function (event) {
    if (event.key === "Escape") this.close();
  };

  window.KhqrCheckout = KhqrCheckout;
})(window);
