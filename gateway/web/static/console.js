// The console's only script, served from our own origin (CSP script-src 'self'): it polls
// JSON endpoints to keep counts and progress bars fresh without a reload, and copies
// webhook URLs. Every page works without it (reload for fresh numbers).
"use strict";
(function () {
  function poll(el) {
    var url = el.getAttribute("data-poll");
    var every = parseInt(el.getAttribute("data-every") || "2000", 10);
    function tick() {
      fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          if (!data) { return; }
          el.querySelectorAll("[data-field]").forEach(function (node) {
            var value = data;
            node.getAttribute("data-field").split(".").forEach(function (k) {
              value = value == null ? null : value[k];
            });
            if (value == null) { return; }
            if (node.tagName === "PROGRESS") { node.value = value; }
            else { node.textContent = String(value); }
          });
          if (el.hasAttribute("data-reload-when") &&
              ["finished", "failed"].indexOf(data.status) >= 0) {
            window.location.reload();
            return;
          }
          window.setTimeout(tick, every);
        })
        .catch(function () { window.setTimeout(tick, every * 2); });
    }
    window.setTimeout(tick, every);
  }
  document.querySelectorAll("[data-poll]").forEach(poll);
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    button.hidden = false;
    button.addEventListener("click", function () {
      var text = document.getElementById(button.getAttribute("data-copy")).textContent;
      navigator.clipboard.writeText(text).then(function () { button.textContent = "Copied"; });
    });
  });
})();
