"use strict";
(function () {
  const LEVELS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_";
  const CUT = "#e8590c";
  const body = document.body;
  const search = document.getElementById("search");
  const hide = document.getElementById("hide-flagged");
  const shown = document.getElementById("shown");
  const jobs = Array.from(document.querySelectorAll("section.job"));
  const rows = Array.from(document.querySelectorAll("table.jobs tbody tr"));

  function draw(canvas) {
    const peaks = canvas.dataset.peaks || "";
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, n = peaks.length;
    ctx.clearRect(0, 0, w, h);
    const color = canvas.closest(".flagged") ? "#d0a19c" : "#5b74e0";
    // A re-roll or extend: the part kept from its parent is drawn grey, the cut marked.
    const cut = canvas.dataset.cut ? parseFloat(canvas.dataset.cut) * w : null;
    for (let i = 0; i < n; i++) {
      const v = Math.max(LEVELS.indexOf(peaks[i]), 0) / 63;
      const bh = Math.max(1, v * (h - 2));
      ctx.fillStyle = cut !== null && (i + 0.5) * w / n < cut ? "#a9b0c2" : color;
      ctx.fillRect(i * w / n, (h - bh) / 2, Math.max(1, w / n - 0.5), bh);
    }
    if (cut !== null) {  // full height: the bars never reach the top row, the cut does
      ctx.fillStyle = CUT;
      ctx.fillRect(Math.round(cut) - 1, 0, 2, h);
    }
  }

  const seen = new IntersectionObserver(function (entries) {
    for (const e of entries) {
      if (e.isIntersecting) { draw(e.target); seen.unobserve(e.target); }
    }
  }, { rootMargin: "400px" });
  document.querySelectorAll("canvas.wave").forEach(function (c) { seen.observe(c); });

  // One player at a time.
  document.addEventListener("play", function (ev) {
    document.querySelectorAll("audio").forEach(function (a) { if (a !== ev.target) a.pause(); });
  }, true);

  function apply() {
    const q = search.value.trim().toLowerCase();
    let visible = 0;
    for (const j of jobs) {
      const match = !q || j.dataset.search.includes(q);
      j.classList.toggle("hidden", !match);
      if (match) {
        visible += j.querySelectorAll(hide.checked ? "li.take:not(.flagged)" : "li.take").length;
      }
    }
    for (const r of rows) r.classList.toggle("hidden", !!q && !r.dataset.search.includes(q));
    body.classList.toggle("hide-flagged", hide.checked);
    shown.textContent = visible + " takes shown";
  }
  // Keepers: toggled here, kept in this browser across reloads, applied by the command.
  const bar = document.getElementById("keep-bar");
  const storeKey = "khala-keep:" + location.pathname;
  const boxes = Array.from(document.querySelectorAll("li.take input.keep-box"));
  function loadMarks() {
    try { return JSON.parse(localStorage.getItem(storeKey) || "{}"); } catch (e) { return {}; }
  }
  // Python's shlex.quote, word for word: ids and the folder come from files on disk.
  function shellQuote(s) {
    if (s === "") return "''";
    if (/^[A-Za-z0-9_@%+=:,.\/-]+$/.test(s)) return s;
    return "'" + s.replace(/'/g, "'\"'\"'") + "'";
  }
  function keepCommand() {
    const keep = [], drop = [];
    for (const box of boxes) {
      const li = box.closest("li.take");
      const onDisk = li.dataset.kept === "1";
      if (box.checked && !onDisk) keep.push(li.dataset.take);
      if (!box.checked && onDisk) drop.push(li.dataset.take);
    }
    if (!keep.length && !drop.length) return "";
    const words = ["khala", "keep", bar.dataset.dir].concat(keep);
    for (const d of drop) words.push("--drop", d);
    return words.map(shellQuote).join(" ");
  }
  function showKeep() {
    const marks = {};
    let kept = 0;
    for (const box of boxes) {
      const li = box.closest("li.take");
      li.classList.toggle("kept", box.checked);
      if (box.checked) kept++;
      if (box.checked !== (li.dataset.kept === "1")) marks[li.dataset.take] = box.checked;
    }
    try { localStorage.setItem(storeKey, JSON.stringify(marks)); } catch (e) { /* private mode */ }
    const cmd = keepCommand();
    document.getElementById("keep-cmd").textContent = cmd;
    document.getElementById("kept-count").textContent = kept + " kept";
    bar.classList.toggle("changed", cmd !== "");
  }
  const saved = loadMarks();
  for (const box of boxes) {
    const id = box.closest("li.take").dataset.take;
    if (id in saved) box.checked = !!saved[id];
    box.addEventListener("change", showKeep);
  }
  document.getElementById("copy-keep").addEventListener("click", function () {
    const text = keepCommand();
    const done = function () { document.getElementById("copied").textContent = "copied"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () {});
    } else {
      const area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
      done();
    }
  });
  showKeep();

  search.addEventListener("input", apply);
  hide.addEventListener("change", apply);
  apply();
})();
