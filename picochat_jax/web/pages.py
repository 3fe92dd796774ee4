"""The workbench's HTML: plain server-rendered pages (every value escaped), a little vendored JavaScript for
sorting, filtering, curves and chat. No template engine and no build step."""

from __future__ import annotations

import json
from html import escape
from typing import Any
from urllib.parse import quote

from picochat_jax.markdown import number

NAV = (("/", "Runs"), ("/compare", "Compare"), ("/data", "Data"), ("/chat", "Chat"), ("/jobs", "Jobs"))


def e(value: Any) -> str:
    return escape("" if value is None else str(value))


def fmt(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return e(value if value is not None else "–")
    if isinstance(value, int) and spec == ".4f":  # counts read as counts
        return f"{value:,}"
    return number(value, spec)


def data_json(element_id: str, payload: Any) -> str:
    """JSON for the page's scripts; `</` is escaped so no value can close the script element."""
    text = json.dumps(payload, default=str).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def layout(title: str, body: str, active: str = "/") -> str:
    current = ' aria-current="page"'
    links = "".join(f'<a href="{href}"{current if href == active else ""}>{name}</a>' for href, name in NAV)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · picochat workbench</title><link rel="stylesheet" href="/static/style.css"></head>
<body><header><span class="brand">picochat workbench</span><nav aria-label="main">{links}</nav></header>
<main id="main"><h1>{e(title)}</h1>{body}</main>
<script src="/static/chart.js"></script><script src="/static/app.js"></script></body></html>"""


def badge(value: Any) -> str:
    return f'<span class="badge badge-{e(value)}">{e(value or "–")}</span>'


def table(headers: list[tuple[str, str]], rows: list[dict[str, Any]], sortable: bool = False,
          table_id: str = "") -> str:
    """headers: (key, label); cells are pre-rendered HTML in rows[key]; `data-sort` carries the raw value."""
    def head(i: int, label: str) -> str:
        if not sortable:
            return e(label)
        return f'<button type="button" class="sort" data-key="{i}">{e(label)}</button>'

    ths = "".join(f'<th scope="col">{head(i, label)}</th>' for i, (_, label) in enumerate(headers))
    body = []
    for row in rows:
        cells = "".join(f'<td data-sort="{e(row.get("_sort_" + key, ""))}">{row.get(key, "")}</td>'
                        for key, _ in headers)
        attrs = " ".join(f'data-{k[5:]}="{e(v)}"' for k, v in row.items() if k.startswith("_row_"))
        body.append(f"<tr {attrs}>{cells}</tr>")
    id_attr = f' id="{table_id}"' if table_id else ""
    class_attr = ' class="sortable"' if sortable else ""
    return f'<table{id_attr}{class_attr}><thead><tr>{ths}</tr></thead><tbody>{"".join(body)}</tbody></table>'



# ------------------------------------------------------------------------------------------------ runs


def runs_page(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return layout("Runs", "<p>No runs under the runs root yet. Start one on the <a href=\"/jobs\">Jobs</a> "
                              "page or with <code>picochat run tiny</code>.</p>")
    cells = []
    for r in rows:
        cells.append({
            "name": f'<a href="/runs/{quote(r["name"])}">{e(r["name"])}</a>', "_sort_name": r["name"],
            "kind": e(r["kind"]), "_sort_kind": r["kind"], "scale": e(r["scale"] or "–"), "_sort_scale": r["scale"],
            "status": badge(r["status"]), "_sort_status": r["status"],
            "verdict": badge(r["verdict"]), "_sort_verdict": r["verdict"] or "",
            "wall": fmt(r["wall_sec"], ",.0f"), "_sort_wall": r["wall_sec"] or 0,
            "tokens": fmt(r["tokens"], ",.0f"), "_sort_tokens": r["tokens"] or 0,
            "base": fmt(r["base_loss"]), "_sort_base": r["base_loss"] if r["base_loss"] is not None else "",
            "sft": fmt(r["sft_loss"]), "_sort_sft": r["sft_loss"] if r["sft_loss"] is not None else "",
            "val": fmt(r["val_loss"]), "_sort_val": r["val_loss"] if r["val_loss"] is not None else "",
            "started": e(r["started"] or "–"), "_sort_started": r["started"] or "",
        })
    headers = [("name", "run"), ("kind", "kind"), ("scale", "scale"), ("status", "status"), ("verdict", "gate"),
               ("wall", "wall s"), ("tokens", "tokens"), ("base", "base loss"), ("sft", "SFT loss"),
               ("val", "held-out loss"), ("started", "started")]
    return layout("Runs", table(headers, cells, sortable=True, table_id="runs"))


def _kv(obj: dict[str, Any], keys: list[str] | None = None) -> str:
    keys = keys or [k for k, v in obj.items() if not isinstance(v, (dict, list))]
    return "<dl class=\"kv\">" + "".join(f"<dt>{e(k)}</dt><dd>{fmt(obj.get(k))}</dd>" for k in keys) + "</dl>"


def run_page(d: dict[str, Any]) -> str:
    row = d["row"]
    name = row["name"]
    parts = [f'<p>{e(d["kind"])} · scale {e(row["scale"] or "–")} · status {badge(row["status"])} · gate '
             f'{badge(row["verdict"])}</p>']
    if d["stage_sec"]:
        total = sum(d["stage_sec"].values()) or 1.0
        bars = "".join(f'<li style="flex-grow:{max(v / total, 0.02):.3f}" title="{e(k)}: {v:.1f} s">'
                       f'<span>{e(k)}</span> <small>{v:.1f} s</small></li>' for k, v in d["stage_sec"].items())
        parts.append(f'<section><h2>Stage timeline</h2><ol class="timeline">{bars}</ol></section>')
    parts.append('<section><h2>Curves</h2><div class="charts" id="charts" aria-live="polite"></div>'
                 f'{data_json("curves", d["curves"])}{data_json("run-meta", {"name": name, "status": row["status"]})}'
                 '</section>')
    stage_rows = [{"stage": e(s), "steps": fmt(i.get("steps"), ",.0f"), "first": fmt(i.get("first_loss")),
                   "final": fmt(i.get("final_loss")), "val": fmt(i.get("final_val_loss")),
                   "bpb": fmt(i.get("final_val_bpb")), "tps": fmt(i.get("tokens_per_sec"), ",.0f"),
                   "mfu": fmt(i.get("mfu"), ".3f")} for s, i in d["stages"].items()]
    if stage_rows:
        parts.append("<section><h2>Stages</h2>" + table(
            [("stage", "stage"), ("steps", "steps"), ("first", "first loss"), ("final", "final loss"),
             ("val", "held-out loss"), ("bpb", "held-out BPB"), ("tps", "tokens/s"), ("mfu", "MFU")],
            stage_rows) + "</section>")
    if d["report"]:
        rep = d["report"]
        parts.append("<section><h2>Fine-tune report</h2>" + _kv(rep, [
            k for k in ("model", "family", "status", "steps", "initial_val_loss", "best_val_loss", "final_val_loss",
                        "tokens_per_sec", "effective_tokens_per_sec", "precision", "quantize") if k in rep]) +
            "</section>")
    if d["preflight"]:
        pre = d["preflight"]
        checks = [{"name": e(c.get("name")), "level": badge(c.get("level")), "value": fmt(c.get("value")),
                   "message": e(c.get("message"))} for c in pre.get("checks") or []]
        parts.append(f"<section><h2>Preflight {badge(pre.get('status'))}</h2>" + table(
            [("name", "check"), ("level", "level"), ("value", "value"), ("message", "message")], checks) +
            "</section>")
    if d["fit"]:
        fit = d["fit"]
        held = d["fit_heldout"]
        parts.append("<section><h2>SFT fit</h2><p>Training rows reproduced: "
                     f"{fmt(fit.get('reproduced'), ',.0f')}/{fmt(fit.get('rows'), ',.0f')} "
                     f"({fmt(fit.get('reproduced_rate'), '.1%')})"
                     + (f"; held-out SFT rows: {fmt(held.get('reproduced'), ',.0f')}/{fmt(held.get('rows'), ',.0f')}"
                        if held else "") + "</p></section>")
    if d["eval_rows"]:
        ev = d["eval"]
        categories = sorted({str(r.get("category")) for r in d["eval_rows"]})
        options = "".join(f'<option value="{e(c)}">{e(c)}</option>' for c in categories)
        rows = [{"line": fmt(r.get("line"), ".0f"), "category": e(r.get("category")), "prompt": e(r.get("prompt")),
                 "reply": e(r.get("reply")), "pass": badge("pass" if r.get("pass") else "fail"),
                 "reasons": e(", ".join(r.get("reasons") or [])),
                 "_row_category": r.get("category"), "_row_result": "pass" if r.get("pass") else "fail"}
                for r in d["eval_rows"]]
        parts.append(
            f"<section><h2>Eval scoreboard: {fmt(ev.get('passed'), ',.0f')}/{fmt(ev.get('rows'), ',.0f')} passed "
            f"({fmt(ev.get('pass_rate'), '.1%')})</h2>"
            '<form class="filters" id="eval-filters"><label>Category <select name="category">'
            f'<option value="">all</option>{options}</select></label> <label>Result <select name="result">'
            '<option value="">all</option><option value="pass">pass</option><option value="fail">fail</option>'
            '</select></label> <output id="eval-count" aria-live="polite"></output></form>'
            + table([("line", "line"), ("category", "category"), ("prompt", "prompt"), ("reply", "reply"),
                     ("pass", "result"), ("reasons", "reasons")], rows, table_id="eval") + "</section>")
    if d["honesty"]:
        hon = d["honesty"]
        findings = hon.get("findings") or []
        items = "".join(f"<li>{e(f if isinstance(f, str) else json.dumps(f))}</li>" for f in findings)
        parts.append(f"<section><h2>Honesty {badge(hon.get('status'))}</h2>"
                     + _kv(hon.get("counts") or {}) + (f"<ul>{items}</ul>" if items else "") + "</section>")
    if d["gate"]:
        gate = d["gate"]
        checks = [{"name": e(c.get("name")), "verdict": badge(c.get("verdict")), "value": fmt(c.get("value")),
                   "threshold": e(c.get("threshold")), "reason": e(c.get("reason"))}
                  for c in gate.get("checks") or []]
        profile = gate.get("profile")
        profile = profile.get("name") if isinstance(profile, dict) else profile
        parts.append(f"<section><h2>Release gate: {badge(gate.get('decision'))} "
                     f"<small>profile {e(profile)}</small></h2>"
                     + table([("name", "check"), ("verdict", "verdict"), ("value", "value"),
                              ("threshold", "threshold"), ("reason", "reason")], checks)
                     + (f"<details open><summary>Release card</summary><pre>{e(d['card'])}</pre></details>"
                        if d["card"] else "") + "</section>")
    links = "".join(f'<li><a href="/files/{quote(name)}/{quote(f["path"])}">{e(f["path"])}</a> '
                    f'<small>{f["bytes"]:,} bytes</small></li>' for f in d["files"])
    parts.append(f"<section><h2>Evidence files</h2><ul class=\"files\">{links}</ul></section>")
    return layout(f"Run {name}", "".join(parts))


def compare_page(all_runs: list[dict[str, Any]], chosen: list[dict[str, Any]],
                 curves: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    picked = {r["name"] for r in chosen}
    boxes = "".join(f'<label><input type="checkbox" name="run" value="{e(r["name"])}"'
                    f'{" checked" if r["name"] in picked else ""}> {e(r["name"])}</label>' for r in all_runs)
    form = (f'<form method="get" action="/compare" class="pick"><fieldset><legend>Runs to compare (the first '
            f'is the reference)</legend>{boxes}</fieldset><button type="submit">Compare</button></form>')
    if len(chosen) < 2:
        return layout("Compare", form + "<p>Pick two or more runs.</p>", "/compare")
    ref = chosen[0]
    keys = [("base_loss", "base loss", ".4f"), ("sft_loss", "SFT loss", ".4f"), ("val_loss", "held-out loss", ".4f"),
            ("tokens", "tokens", ",.0f"), ("wall_sec", "wall s", ",.1f")]
    rows = []
    for r in chosen:
        row = {"run": e(r["name"]), "scale": e(r["scale"]), "verdict": badge(r["verdict"])}
        for key, _, spec in keys:
            v, base = r.get(key), ref.get(key)
            diff = ""
            if r is not ref and isinstance(v, (int, float)) and isinstance(base, (int, float)):
                diff = f' <small class="diff">({number(v - base, "+" + spec)})</small>'
            row[key] = fmt(v, spec) + diff
        rows.append(row)
    headers = [("run", "run"), ("scale", "scale"), *[(k, label) for k, label, _ in keys], ("verdict", "gate")]
    body = (form + table(headers, rows, table_id="compare") +
            '<section><h2>Curves, overlaid</h2><div class="charts" id="compare-charts"></div>'
            f'{data_json("compare-curves", curves)}</section>')
    return layout("Compare", body, "/compare")


# ------------------------------------------------------------------------------------------------ data


def packs_page(packs: list[dict[str, Any]]) -> str:
    if not packs:
        return layout("Data", "<p>No dataset_pack.json under the packs root.</p>", "/data")
    def item(p: dict[str, Any]) -> str:
        about = f"<br><span>{e(p['description'])}</span>" if p.get("description") else ""
        return f'<li><a href="/data/{quote(p["path"])}">{e(p["name"])}</a> <small>{e(p["path"])}</small>{about}</li>'

    items = "".join(item(p) for p in packs)
    return layout("Data", f'<ul class="packs">{items}</ul>', "/data")


def pack_page(d: dict[str, Any]) -> str:
    parts = []
    errors = d["errors"]
    parts.append("<section><h2>Validation</h2>" + (
        '<p>' + badge("pass") + " every file reads cleanly</p>" if not errors else
        f'<p>{badge("fail")} {len(errors)} problem(s)</p><ul class="errors">'
        + "".join(f"<li><code>{e(x)}</code></li>" for x in errors) + "</ul>") + "</section>")
    files = [{"role": e(f["role"]), "path": e(f["path"]), "bytes": fmt(f["bytes"], ",.0f")} for f in d["files"]]
    parts.append("<section><h2>Files</h2>" + table([("role", "role"), ("path", "file"), ("bytes", "bytes")], files)
                 + _kv({k: v for k, v in (d["summary"].get("corpus") or {}).items()}) + "</section>")
    ins = d.get("inspect")
    if ins:
        total = ins["total"]
        parts.append("<section><h2>Figures</h2>" + _kv({
            "documents": total.get("documents"), "bytes": total.get("bytes"), "est. tokens": total.get("tokens"),
            "chat rows": ins["chat_rows"], "eval rows": ins["eval_rows"], "preference rows": ins["preference_rows"]})
            + "</section>")
        ready = ins["readiness"]
        checks = [{"name": e(c.get("name")), "level": badge(c.get("level")), "message": e(c.get("message"))}
                  for c in ready.get("checks") or []]
        parts.append(f"<section><h2>Readiness for {e(ins['scale'])} {badge(ready['status'])}</h2>"
                     + table([("name", "check"), ("level", "level"), ("message", "message")], checks) + "</section>")
    elif d.get("inspect_error"):
        parts.append(f"<section><h2>Readiness</h2><p><code>{e(d['inspect_error'])}</code></p></section>")
    for role, lines in d["preview"].items():
        parts.append(f"<section><h2>Preview: {e(role)}</h2><pre class=\"preview\">"
                     + "\n".join(e(x) for x in lines) + "</pre></section>")
    return layout(f"Pack {d['path']}", "".join(parts), "/data")


# ------------------------------------------------------------------------------------------------ chat, jobs


def chat_page(models: list[dict[str, str]]) -> str:
    if not models:
        return layout("Chat", "<p>No checkpoints or HF folders under the runs root yet.</p>", "/chat")
    options = "".join(f'<option value="{e(m["id"])}">{e(m["label"])}</option>' for m in models)
    body = f"""<form id="chat-form" class="chat">
<label>Model <select name="model" id="chat-model">{options}</select></label>
<fieldset class="sampling"><legend>Sampling</legend>
<label>temperature <input name="temperature" type="number" min="0" max="2" step="any" value="0"></label>
<label>top_p <input name="top_p" type="number" min="0.01" max="1" step="any" value="1"></label>
<label>max tokens <input name="max_tokens" type="number" min="1" max="4096" value="64"></label></fieldset>
<ol id="chat-log" class="chat-log" aria-live="polite"></ol>
<label for="chat-input">Message</label><textarea id="chat-input" name="message" rows="3" required></textarea>
<button type="submit" id="chat-send">Send</button> <span id="chat-status" role="status"></span></form>"""
    return layout("Chat", body, "/chat")


def jobs_page(jobs: list[dict[str, Any]], packs: list[dict[str, Any]], scales: tuple[str, ...]) -> str:
    pack_opts = "".join(f'<option value="{e(p["path"])}">{e(p["name"])} ({e(p["path"])})</option>' for p in packs)
    scale_opts = "".join(f'<option value="{e(s)}"{" selected" if s == "pico" else ""}>{e(s)}</option>'
                         for s in scales)
    device = ('<label>device <select name="device"><option>cpu</option><option>cuda</option><option>tpu</option>'
              '</select></label>')
    forms = f"""<section><h2>Start a run</h2>
<form class="job" data-command="run-tiny"><input type="hidden" name="command" value="run-tiny">
<label>run name <input name="name" required pattern="[A-Za-z0-9][A-Za-z0-9._-]*"></label>
<label>dataset pack <select name="dataset_pack">{pack_opts}</select></label>
<label>scale <select name="scale">{scale_opts}</select></label>{device}
<label>base steps <input name="base_steps" type="number" min="1"></label>
<label>SFT steps <input name="sft_steps" type="number" min="1"></label>
<button type="submit">Start run tiny</button></form>
<form class="job" data-command="hf-sft"><input type="hidden" name="command" value="hf-sft">
<label>run name <input name="name" required pattern="[A-Za-z0-9][A-Za-z0-9._-]*"></label>
<label>HF model folder <input name="model" required placeholder="relative to the runs or packs root"></label>
<label>chat JSONL <input name="input" required placeholder="relative to the packs root"></label>
<label>max steps <input name="max_steps" type="number" min="1" value="100"></label>
<label>max length <input name="max_length" type="number" min="16" value="512"></label>
<label>peft <select name="peft"><option>lora</option><option>none</option></select></label>
<label>quantize <select name="quantize"><option>none</option><option>4bit</option></select></label>{device}
<button type="submit">Start hf-sft</button></form>
<p id="job-message" role="status"></p></section>"""
    return layout("Jobs", forms + '<section><h2>Jobs</h2><div id="jobs" aria-live="polite"></div>'
                  + data_json("jobs-data", jobs) + "</section>", "/jobs")


def login_page(error: str = "") -> str:
    alert = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    return layout("Sign in", f"""<form method="post" action="/login" class="login">
<label>Access token <input type="password" name="token" autocomplete="current-password" required></label>
<button type="submit">Sign in</button>{alert}</form>""")
