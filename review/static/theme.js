// Applies the saved theme before the page paints (no flash of the wrong theme at midnight).
(function () {
  try {
    var saved = window.localStorage.getItem("remontee-theme");
    if (saved === "dark" || saved === "light") document.documentElement.setAttribute("data-theme", saved);
  } catch (e) { /* storage disabled: follow the system */ }
})();
