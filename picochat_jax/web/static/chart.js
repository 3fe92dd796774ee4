/* picochat workbench line charts: a small canvas plotter (no dependencies, shipped with the package).
   PicoChart.draw(canvas, series, {title, logY}) where series = [{label, points: [[x, y], ...]}].
   After drawing, canvas.dataset.points holds how many points were drawn (the browser tests read it). */
(function () {
  "use strict";
  var COLORS = ["#1f5fbf", "#c0392b", "#1b7f3b", "#8e44ad", "#d35400", "#16a085", "#2c3e50", "#b7950b"];

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / count)));
    var err = (hi - lo) / count / step;
    step *= err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1;
    var ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) { ticks.push(v); }
    return ticks;
  }

  function label(v) {
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) { return v.toExponential(1); }
    return String(parseFloat(v.toPrecision(3)));
  }

  function draw(canvas, series, opts) {
    opts = opts || {};
    var ratio = window.devicePixelRatio || 1;
    var width = canvas.clientWidth || 360, height = canvas.clientHeight || 220;
    canvas.width = width * ratio; canvas.height = height * ratio;
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    var pts = [];
    series.forEach(function (s) { s.points.forEach(function (p) { if (isFinite(p[1])) { pts.push(p); } }); });
    canvas.dataset.points = String(pts.length);
    if (!pts.length) {
      ctx.fillStyle = "#5b6678"; ctx.font = "13px system-ui"; ctx.fillText("no data yet", 12, 24);
      return;
    }
    var xs = pts.map(function (p) { return p[0]; }), ys = pts.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (x1 === x0) { x1 = x0 + 1; }
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    var pad = {l: 58, r: 10, t: 10, b: 26};
    function X(v) { return pad.l + (v - x0) / (x1 - x0) * (width - pad.l - pad.r); }
    function Y(v) { return height - pad.b - (v - y0) / (y1 - y0) * (height - pad.t - pad.b); }
    ctx.strokeStyle = "#e3e7ee"; ctx.fillStyle = "#5b6678"; ctx.font = "11px system-ui"; ctx.lineWidth = 1;
    niceTicks(y0, y1, 4).forEach(function (t) {
      ctx.beginPath(); ctx.moveTo(pad.l, Y(t)); ctx.lineTo(width - pad.r, Y(t)); ctx.stroke();
      ctx.fillText(label(t), 4, Y(t) + 4);
    });
    niceTicks(x0, x1, 5).forEach(function (t) { ctx.fillText(label(t), X(t) - 8, height - 8); });
    series.forEach(function (s, i) {
      var color = s.color || COLORS[i % COLORS.length];
      ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 1.6;
      var good = s.points.filter(function (p) { return isFinite(p[1]); });
      if (s.markers || good.length < 3) {
        good.forEach(function (p) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.5, 0, 6.3); ctx.fill(); });
      }
      ctx.beginPath();
      good.forEach(function (p, j) { if (j) { ctx.lineTo(X(p[0]), Y(p[1])); } else { ctx.moveTo(X(p[0]), Y(p[1])); } });
      ctx.stroke();
    });
  }

  /* One figure (caption, canvas, legend) appended to `parent`; returns the canvas. */
  function figure(parent, title, series) {
    var fig = document.createElement("figure");
    var cap = document.createElement("figcaption"); cap.textContent = title;
    var canvas = document.createElement("canvas");
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", title + ": " + series.map(function (s) {
      var last = s.points.length ? s.points[s.points.length - 1] : null;
      return s.label + (last ? " ends at " + label(last[1]) + " (step " + last[0] + ")" : " (no points)");
    }).join("; "));
    var legend = document.createElement("div"); legend.className = "legend";
    legend.innerHTML = series.map(function (s, i) {
      return '<span style="color:' + (s.color || COLORS[i % COLORS.length]) + '">■</span> ' +
        s.label.replace(/[&<>]/g, function (c) { return {"&": "&amp;", "<": "&lt;", ">": "&gt;"}[c]; });
    }).join(" &nbsp; ");
    fig.appendChild(cap); fig.appendChild(canvas); fig.appendChild(legend); parent.appendChild(fig);
    draw(canvas, series);
    return canvas;
  }

  window.PicoChart = {draw: draw, figure: figure, colors: COLORS};
})();
