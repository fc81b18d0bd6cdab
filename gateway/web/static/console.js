// The console's only script, served from our own origin (CSP script-src 'self'): it polls
// JSON endpoints to keep counts, tables, charts and progress bars fresh without a reload,
// and copies webhook URLs. Every page works without it (reload for fresh numbers).
"use strict";
(function () {
  // A table body redrawn from JSON rows, as text only (never markup): data-cols names
  // the keys in column order, data-num the right-aligned ones.
  function fill(body, rows) {
    var cols = body.getAttribute("data-cols").split(",");
    var num = (body.getAttribute("data-num") || "").split(",");
    var headings = [];
    body.parentNode.querySelectorAll("thead th").forEach(function (th) {
      headings.push(th.textContent);
    });
    var fresh = document.createDocumentFragment();
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      cols.forEach(function (key, k) {
        var td = document.createElement("td");
        td.textContent = row[key] == null ? "" : String(row[key]);
        td.setAttribute("data-label", headings[k] || "");  // small screens: cards
        if (num.indexOf(key) >= 0) { td.className = "n"; }
        tr.appendChild(td);
      });
      fresh.appendChild(tr);
    });
    if (!rows.length) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      td.colSpan = cols.length;
      td.textContent = body.getAttribute("data-empty") || "";
      tr.appendChild(td);
      fresh.appendChild(tr);
    }
    body.replaceChildren(fresh);
  }
  // A chart the server drew (escaped there), parsed as SVG: an SVG document parsed this
  // way runs no script, and the CSP forbids inline script anyway.
  function drawSvg(box, markup) {
    var doc = new DOMParser().parseFromString(markup, "image/svg+xml");
    if (doc.documentElement.nodeName !== "svg") { return; }
    box.replaceChildren(document.importNode(doc.documentElement, true));
  }
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
          el.querySelectorAll("tbody[data-rows]").forEach(function (body) {
            var rows = data[body.getAttribute("data-rows")];
            if (Array.isArray(rows)) { fill(body, rows); }
          });
          el.querySelectorAll("[data-svg]").forEach(function (box) {
            var markup = data[box.getAttribute("data-svg")];
            if (typeof markup === "string") { drawSvg(box, markup); }
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
