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
    // The page is the card: the modal is its size, with the close control on it.
    var box = css(doc.createElement("div"), {
      position: "relative", overflow: "hidden", background: "#fff"
    });
    var frame = css(doc.createElement("iframe"), {
      width: "100%", height: "100%", border: "0", display: "block"
    });
    frame.title = "KHQR payment";
    frame.src = this.url.href;
    var close = css(doc.createElement("button"), {
      position: "absolute", top: "8px", right: "8px", width: "36px", height: "36px",
      font: "24px sans-serif", color: "#fff", background: "rgba(0,0,0,.25)", border: "0",
      borderRadius: "50%", cursor: "pointer"
    });
    close.type = "button";
    close.setAttribute("aria-label", "Close");
    close.textContent = "\u00d7";
    close.onclick = this.close.bind(this);
    box.appendChild(frame);
    box.appendChild(close);
    overlay.appendChild(box);
    doc.body.appendChild(overlay);
    this.overlay = overlay;
    this.frame = frame;
    // Full screen on a phone, a card elsewhere; again whenever the window changes.
    var phone = window.matchMedia("(max-width: 480px)");
    this._fit = function () {
      css(box, phone.matches ? { width: "100vw", height: "100vh", borderRadius: "0" }
        : { width: "min(380px, 100vw)", height: "min(640px, 100vh)", borderRadius: "14px" });
    };
    this._fit();
    window.addEventListener("resize", this._fit);
    window.addEventListener("message", this._onMessage);
    doc.addEventListener("keydown", this._onKey);
    close.focus();
    return this;
  };

  KhqrCheckout.prototype.close = function () {
    if (!this.overlay) return;
    window.removeEventListener("message", this._onMessage);
    window.removeEventListener("resize", this._fit);
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
