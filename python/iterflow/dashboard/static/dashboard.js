// iterflow dashboard: live refresh and confirmations. No dependencies.
// An element with data-refresh="URL" has its content replaced by URL's fragment every
// data-refresh-ms, while the page is visible and the live-refresh box (if any) is checked.
(function () {
  "use strict";
  function refresher(el) {
    var url = el.getAttribute("data-refresh");
    var every = parseInt(el.getAttribute("data-refresh-ms"), 10) || 5000;
    var toggle = document.getElementById("live-toggle");
    var state = document.getElementById("live-state");
    function tick() {
      if (document.hidden || (toggle && !toggle.checked)) { return; }
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.text(); })
        .then(function (html) {
          el.innerHTML = html;
          if (state) { state.textContent = "updated " + new Date().toLocaleTimeString(); }
        })
        .catch(function (err) { if (state) { state.textContent = "refresh failed: " + err.message; } });
    }
    setInterval(tick, every);
  }
  function confirmations() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { ev.preventDefault(); }
      });
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(refresher);
    confirmations();
  });
})();
