// Typeset the math that pymdownx.arithmatex (generic mode) leaves in the page.
// Arithmatex wraps inline math as <span class="arithmatex">\( ... \)</span> and display math as
// <div class="arithmatex">\[ ... \]</div>; we strip the delimiters and hand the TeX to the KaTeX
// copy served from this site (docs/assets/katex), so pages render without network access.
(function () {
  function typeset(root) {
    root.querySelectorAll(".arithmatex").forEach(function (el) {
      if (el.dataset.katexDone) return;
      var tex = el.textContent.trim();
      var display = el.tagName === "DIV";
      if (tex.startsWith("\\(") || tex.startsWith("\\[")) tex = tex.slice(2, -2);
      katex.render(tex, el, { displayMode: display, throwOnError: false });
      el.dataset.katexDone = "1";
    });
  }
  // Material re-renders pages without a reload under navigation.instant; document$ fires each time.
  if (typeof document$ !== "undefined") {
    document$.subscribe(function (doc) { typeset(doc.body || document.body); });
  } else {
    document.addEventListener("DOMContentLoaded", function () { typeset(document.body); });
  }
})();
