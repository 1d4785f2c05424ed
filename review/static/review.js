// Remontée — supervision: small progressive enhancements. Every page works without this script;
// it adds the live arithmetic check, suggestion buttons, the claim heartbeat, the dashboard refresh
// and the theme toggle. No library, no network beyond this site.
"use strict";

(function () {
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrfToken = csrfMeta ? csrfMeta.getAttribute("content") : "";

  // --- theme ---
  function effectiveTheme() {
    var set = document.documentElement.getAttribute("data-theme");
    if (set) return set;
    return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }
  function showTheme() {
    var dark = effectiveTheme() === "dark";
    document.querySelectorAll("[data-theme-toggle]").forEach(function (b) {
      b.textContent = "Thème sombre";
      b.setAttribute("aria-pressed", dark ? "true" : "false");
    });
  }
  document.querySelectorAll("[data-theme-toggle]").forEach(function (b) {
    b.addEventListener("click", function () {
      var next = effectiveTheme() === "dark" ? "light" : "dark";
      document.documentElement.setAttribute("data-theme", next);
      try { window.localStorage.setItem("remontee-theme", next); } catch (e) { /* not kept */ }
      showTheme();
    });
  });
  showTheme();

  // --- an item: live arithmetic check ---
  var form = document.getElementById("approve-form");
  if (form) {
    var inputs = Array.prototype.slice.call(form.querySelectorAll("input.count-input"));
    // A count the server refused (rendered aria-invalid="true") stays marked until it is changed: the check
    // below knows the form's sums, not why the server said no (a count over the bureau's inscrits...).
    var refused = inputs.filter(function (i) { return i.getAttribute("aria-invalid") === "true"; });
    var byField = {};
    inputs.forEach(function (i) { byField[i.dataset.field] = i; });

    function valueOf(input) {
      var text = input.value.replace(/[\s\u00a0\u202f]/g, "");
      if (!/^[0-9]+$/.test(text)) return null;
      return parseInt(text, 10);
    }
    function show(name, ok, text) {
      var p = document.querySelector('[data-check="' + name + '"] .check-result');
      if (!p) return;
      p.textContent = text;
      p.classList.toggle("ok", ok === true);
      p.classList.toggle("bad", ok === false);
    }
    function signed(n) { return (n > 0 ? "+" : "") + n; }
    function check() {
      var votants = null, blancs = null, exprimes = null, sum = 0, sumKnown = true;
      inputs.forEach(function (i) {
        var v = valueOf(i);
        var original = i.closest("tr").querySelector("[data-original]");
        i.classList.toggle("changed", original && original.dataset.original !== i.value.trim());
        var stillRefused = refused.indexOf(i) >= 0 && i.value === i.defaultValue;
        i.setAttribute("aria-invalid", v === null || stillRefused ? "true" : "false");
        if (i.dataset.kind === "votants") votants = v;
        else if (i.dataset.kind === "blancs_nuls") blancs = v;
        else if (i.dataset.kind === "exprimes") exprimes = v;
        else if (v === null) sumKnown = false;
        else sum += v;
      });
      if (votants === null || blancs === null || exprimes === null) show("total", false, "valeur manquante");
      else if (blancs + exprimes === votants) show("total", true, "juste (" + votants + ")");
      else show("total", false, blancs + " + " + exprimes + " = " + (blancs + exprimes) + ", écart " +
                signed(blancs + exprimes - votants));
      if (!sumKnown || exprimes === null) show("sum", false, "valeur manquante");
      else if (sum === exprimes) show("sum", true, "juste (" + sum + ")");
      else show("sum", false, "somme " + sum + ", écart " + signed(sum - exprimes));
      var ins = document.querySelector('[data-check="inscrits"]');
      if (ins) {
        var inscrits = parseInt(ins.dataset.inscrits, 10);
        if (votants === null) show("inscrits", false, "valeur manquante");
        else show("inscrits", votants <= inscrits, votants <= inscrits ? "juste" : "dépassé de " + (votants - inscrits));
      }
    }
    inputs.forEach(function (i) { i.addEventListener("input", check); });
    check();

    // Enter in a count goes to the next count, and stays in the last: the form is sent by its button alone
    // (_decision.html's no_implicit_submit keeps Enter from sending it, with or without this script).
    var stops = Array.prototype.slice.call(form.querySelectorAll("#bureau, input.count-input"))
      .filter(function (i) { return !i.disabled; });
    form.addEventListener("keydown", function (e) {
      var at = stops.indexOf(e.target);
      if (e.key !== "Enter" || at < 0) return;
      e.preventDefault();
      var next = stops[at + 1];
      if (next) { next.focus(); next.select(); }
    });

    function apply(field, value) {
      var input = byField[field];
      if (!input || input.disabled) return;
      input.value = value;
      check();
      input.focus();
    }
    document.querySelectorAll("[data-apply-field]").forEach(function (b) {
      b.addEventListener("click", function () { apply(b.dataset.applyField, b.dataset.applyValue); });
    });
    document.querySelectorAll("[data-copy-column]").forEach(function (b) {
      b.addEventListener("click", function () {
        var attr = b.dataset.copyColumn === "other" ? "data-other" : "data-original";
        form.querySelectorAll("tr[data-row]").forEach(function (tr) {
          var cell = tr.querySelector("[" + attr + "]");
          var input = byField[tr.dataset.row];
          if (cell && input && !input.disabled) input.value = cell.getAttribute(attr);
        });
        check();
      });
    });
  }

  // --- an item: keep the claim while the page is open ---
  var claim = document.querySelector("[data-claim-url]");
  if (claim) {
    var clock = claim.querySelector("[data-claim-clock]");
    window.setInterval(function () {
      fetch(claim.dataset.claimUrl, {
        method: "POST",
        headers: { "X-CSRFToken": csrfToken, "Accept": "application/json" },
        credentials: "same-origin"
      }).then(function (r) { return r.json().then(function (body) { return [r.status, body]; }); })
        .then(function (res) {
          if (res[0] === 200 && clock) {
            clock.textContent = res[1].until;  // the server's clock and time zone, as on the rest of the page
          } else if (res[0] === 409) {
            claim.textContent = "Réservation perdue : " + res[1].message + ". Rechargez la page.";
            claim.classList.add("claim-other");
          } else if (res[0] === 401) {  // the session ran out: said now, before the figures are sent for nothing
            claim.textContent = "Session expirée : " + res[1].message + ".";
            claim.classList.add("claim-other");
          }
        })
        .catch(function () { /* offline for a moment: the next beat tries again */ });
    }, 90 * 1000);
  }

  // --- progress: refresh the panel ---
  var panel = document.querySelector("[data-refresh-url]");
  if (panel) {
    var seconds = parseInt(panel.dataset.refreshSeconds, 10) || 10;
    var paused = false;
    var status = document.querySelector("[data-refresh-status]");
    var toggle = document.querySelector("[data-refresh-toggle]");
    if (toggle) {
      toggle.addEventListener("click", function () {
        paused = !paused;
        toggle.setAttribute("aria-pressed", paused ? "true" : "false");
        toggle.textContent = paused ? "Reprendre l'actualisation" : "Suspendre l'actualisation";
        if (status) status.textContent = paused ? "Actualisation suspendue." : "Actualisation automatique toutes les " + seconds + " s.";
      });
    }
    function refresh() {
      if (paused || document.hidden) return;
      // The redirect to the login is not followed: the login page it leads to would take the « session expirée »
      // the server says on it, and the page reloaded would arrive there without it.
      fetch(panel.dataset.refreshUrl, { credentials: "same-origin", headers: { "Accept": "text/html" },
                                        redirect: "manual" })
        .then(function (r) {
          if (r.type === "opaqueredirect" || r.status === 401) { window.location.reload(); return null; }  // session over
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.text();
        })
        .then(function (html) {
          if (html === null) return;
          // Keep an open <details> open across refreshes.
          var open = panel.querySelector("details[open]") !== null;
          panel.innerHTML = html;
          if (open) { var d = panel.querySelector("details"); if (d) d.open = true; }
          var at = panel.querySelector("[data-state-clock]");
          if (status) status.textContent = "Mis à jour à " + (at ? at.textContent : "?") + " · toutes les " + seconds + " s.";
          panel.dispatchEvent(new CustomEvent("refreshed"));
        })
        .catch(function () {
          if (status) status.textContent = "Échec de l'actualisation ; nouvel essai dans " + seconds + " s.";
        });
    }
    window.setInterval(refresh, seconds * 1000);
  }
})();
