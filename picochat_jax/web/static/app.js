/* picochat workbench: table sorting, eval filters, run curves (live over server-sent events), compare curves,
   chat streaming through the OpenAI-compatible endpoint, and the job launcher. Plain DOM, no build step. */
(function () {
  "use strict";
  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }
  function jsonData(id) { var el = document.getElementById(id); return el ? JSON.parse(el.textContent) : null; }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; }); }

  /* ---- sortable tables: header buttons (keyboard-operable), numeric when both values are numbers */
  $all("table.sortable").forEach(function (table) {
    $all("button.sort", table).forEach(function (button) {
      button.addEventListener("click", function () {
        var col = Number(button.dataset.key), asc = button.getAttribute("aria-sort") !== "ascending";
        $all("button.sort", table).forEach(function (b) { b.removeAttribute("aria-sort"); });
        button.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].dataset.sort, y = b.cells[col].dataset.sort;
          var nx = parseFloat(x), ny = parseFloat(y);
          var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });

  /* ---- eval scoreboard filters */
  var filters = $("#eval-filters");
  if (filters) {
    var apply = function () {
      var cat = filters.category.value, res = filters.result.value, shown = 0;
      $all("#eval tbody tr").forEach(function (tr) {
        var ok = (!cat || tr.dataset.category === cat) && (!res || tr.dataset.result === res);
        tr.hidden = !ok; if (ok) { shown += 1; }
      });
      $("#eval-count").textContent = shown + " row(s) shown";
    };
    filters.addEventListener("change", apply); apply();
  }

  /* ---- curves */
  var METRICS = [
    {title: "loss", keys: [["loss", "train"], ["val_loss", "held-out"]]},
    {title: "bits per byte", keys: [["bpb", "train"], ["val_bpb", "held-out"]]},
    {title: "learning rate", keys: [["lr", "lr"]]},
    {title: "tokens/s", keys: [["tokens_per_sec", "tokens/s"]]},
    {title: "MFU", keys: [["mfu", "MFU"]]},
    {title: "grad norm", keys: [["grad_norm", "grad norm"]]}
  ];
  function seriesFor(curves, metric, prefix) {
    var out = [];
    Object.keys(curves).forEach(function (stage) {
      metric.keys.forEach(function (k) {
        var pts = curves[stage].filter(function (r) { return typeof r[k[0]] === "number"; })
          .map(function (r) { return [r.step, r[k[0]]]; });
        if (pts.length) { out.push({label: (prefix || "") + stage + " " + k[1], points: pts, markers: k[0].indexOf("val_") === 0}); }
      });
    });
    return out;
  }
  function drawAll(container, curves, prefixFn) {
    container.innerHTML = "";
    METRICS.forEach(function (m) {
      var series = [];
      if (prefixFn) {
        Object.keys(curves).forEach(function (run) { series = series.concat(seriesFor(curves[run], m, run + " · ")); });
      } else { series = seriesFor(curves, m); }
      if (series.length) { window.PicoChart.figure(container, m.title, series); }
    });
  }
  var charts = $("#charts");
  if (charts) {
    var curves = jsonData("curves") || {}, meta = jsonData("run-meta");
    drawAll(charts, curves);
    if (meta && meta.status === "running" && window.EventSource) {
      var first = true;
      var source = new EventSource("/api/runs/" + encodeURI(meta.name) + "/events");
      source.onmessage = function (ev) {
        var msg = JSON.parse(ev.data);
        if (first) { curves = {}; first = false; }
        Object.keys(msg.rows).forEach(function (stage) { curves[stage] = (curves[stage] || []).concat(msg.rows[stage]); });
        drawAll(charts, curves);
        charts.dataset.live = msg.status;
        if (msg.status !== "running") { source.close(); }
      };
    }
  }
  var compareCharts = $("#compare-charts");
  if (compareCharts) { drawAll(compareCharts, jsonData("compare-curves") || {}, true); }

  /* ---- chat: streamed through /llm/MODEL/v1/chat/completions (serve's OpenAI API, the one decode engine) */
  var chat = $("#chat-form");
  if (chat) {
    var history = [];
    $("#chat-model").addEventListener("change", function () { history = []; $("#chat-log").innerHTML = ""; });
    chat.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var text = chat.message.value.trim();
      if (!text) { return; }
      history.push({role: "user", content: text});
      var log = $("#chat-log"), user = document.createElement("li"), reply = document.createElement("li");
      user.className = "user"; user.textContent = text; reply.className = "assistant";
      log.appendChild(user); log.appendChild(reply); chat.message.value = "";
      var status = $("#chat-status"); status.textContent = "generating…"; $("#chat-send").disabled = true;
      var body = {model: chat.model.value, messages: history, stream: true,
        temperature: Number(chat.temperature.value), top_p: Number(chat.top_p.value), max_tokens: Number(chat.max_tokens.value)};
      fetch("/llm/" + chat.model.value + "/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify(body), credentials: "same-origin"}).then(function (resp) {
        if (!resp.ok) { return resp.text().then(function (t) { throw new Error(resp.status + " " + t); }); }
        var reader = resp.body.getReader(), decoder = new TextDecoder(), buffer = "";
        function pump() {
          return reader.read().then(function (chunk) {
            if (chunk.done) { return; }
            buffer += decoder.decode(chunk.value, {stream: true});
            var events = buffer.split("\n\n"); buffer = events.pop();
            events.forEach(function (evText) {
              var line = evText.replace(/^data: /, "");
              if (line === "[DONE]" || !line) { return; }
              var delta = JSON.parse(line).choices[0].delta || {};
              if (delta.content) { reply.textContent += delta.content; reply.dataset.chunks = String(Number(reply.dataset.chunks || 0) + 1); }
            });
            return pump();
          });
        }
        return pump();
      }).then(function () {
        history.push({role: "assistant", content: reply.textContent}); status.textContent = "done";
        reply.dataset.done = "true";
      }).catch(function (err) { status.textContent = "error: " + err.message; reply.dataset.done = "error"; })
        .finally(function () { $("#chat-send").disabled = false; });
    });
  }

  /* ---- jobs */
  var jobsBox = $("#jobs");
  if (jobsBox) {
    var render = function (jobs) {
      jobsBox.innerHTML = jobs.length ? "" : "<p>No jobs started from this workbench yet.</p>";
      jobs.forEach(function (j) {
        var card = document.createElement("div"); card.className = "job-card"; card.dataset.status = j.status;
        card.innerHTML = "<p><span class=\"badge badge-" + esc(j.status) + "\">" + esc(j.status) + "</span> <code>" +
          esc(j.command) + "</code> → <a href=\"/runs/" + encodeURI(j.out_dir) + "\">" + esc(j.out_dir) + "</a></p>" +
          (j.status === "running" ? "<button type=\"button\" class=\"cancel\" data-id=\"" + esc(j.id) + "\">Cancel</button>" : "") +
          "<pre aria-label=\"log tail\">" + esc(j.log_tail) + "</pre>";
        jobsBox.appendChild(card);
      });
      $all("button.cancel", jobsBox).forEach(function (b) {
        b.addEventListener("click", function () { fetch("/api/jobs/" + b.dataset.id + "/cancel", {method: "POST"}).then(refresh); });
      });
    };
    var refresh = function () { return fetch("/api/jobs").then(function (r) { return r.json(); }).then(render); };
    render(jsonData("jobs-data") || []);
    setInterval(refresh, 2000);
    $all("form.job").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var data = {};
        new FormData(form).forEach(function (v, k) { if (v !== "") { data[k] = v; } });
        fetch("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(data)})
          .then(function (r) { return r.json().then(function (b) { return [r.ok, b]; }); })
          .then(function (res) {
            $("#job-message").textContent = res[0] ? "started " + res[1].command : "refused: " + res[1].error.message;
            refresh();
          });
      });
    });
  }
})();
