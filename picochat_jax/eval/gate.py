"""The release gate: read a run's evidence files, decide pass or block, write the release card.

A finished run is not a release. The gate reads what the run left on disk (never the run's memory), so it
can be re-run later, with another profile, on any run folder:

    preflight.json, summary.json, sft_fit/fit_report.json, eval/eval_report.json,
    honesty/honesty_report.json, external_eval/eval_report.json (when the pack names a benchmark)

Each check is `{name, value, threshold, verdict: pass|warn|block, reason[, interval]}`; missing or unreadable
evidence fails its check, never a silent pass. A failed check blocks unless the profile lists it under
`warn_checks`; the decision is `blocked` (any block), `warn` (only warnings) or `approved`. Rates measured on
eval or SFT rows carry a 95% bootstrap interval (`ci_bootstrap_samples`). Thresholds come from a gate profile
(`configs/gate/<name>.yaml`: default, research, first_release, skill_release; or a YAML path, plus `key=value`
overrides). Outputs: `release/gate.json` and `release/release_card.md`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from picochat_jax.config import CONFIG_DIR
from picochat_jax.data.records import DataError
from picochat_jax.fileio import read_json_object, read_jsonl_objects, save_json, save_text

GATE_CONFIG_DIR = CONFIG_DIR / "gate"

HELDOUT_FIT = "sft_fit/heldout/fit_report.json"  # SFT rows held out of training, replayed

EVIDENCE = {
    "preflight": "preflight.json",
    "summary": "summary.json",
    "sft_fit": "sft_fit/fit_report.json",
    "eval": "eval/eval_report.json",
    "honesty": "honesty/honesty_report.json",
    "external_eval": "external_eval/eval_report.json",
}


@dataclass(frozen=True)
class GateProfile:
    name: str = "default"
    min_eval_rows: int = 10
    min_eval_pass_rate: float = 0.6
    max_prompt_echo_rate: float = 0.1
    max_answerable_refusal_rate: float = 0.3
    max_eval_rows_in_sft: int = 0
    max_eval_rows_in_corpus: int = 0
    max_memorization_rate: float = 0.5
    min_sft_fit_f1: float = 0.5
    min_external_pass_rate: float = 0.25
    allow_preflight_override: bool = False
    # The original picochat's release checks; None leaves a check out of the profile.
    min_sft_fit_rate: float | None = None  # share of SFT rows reproduced exactly
    min_heldout_sft_fit_rate: float | None = None  # the same on SFT rows held out of training
    min_non_choice_pass_rate: float | None = None  # eval rows without choice_labels ...
    min_non_choice_rows: int = 20  # ... judged only when there are at least this many
    min_refusal_pass_rate: float | None = None  # unanswerable rows passed (refused as they should be)
    max_unsupported_claim_rate: float | None = None  # unanswerable rows answered instead, over all rows
    min_category_pass_rate: dict[str, float] = dataclasses.field(default_factory=dict)  # per-skill thresholds
    require_external: bool = False  # an external benchmark must be attached (release profiles)
    warn_checks: tuple[str, ...] = ()  # checks whose failure warns instead of blocking ("category:*" = all)
    ci_bootstrap_samples: int = 1000

    def thresholds(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k != "name"}

    def severity(self, check: str) -> str:
        wildcard = check.split(":")[0] + ":*"
        return "warn" if check in self.warn_checks or wildcard in self.warn_checks else "block"


OPTIONAL_RATES = {"min_sft_fit_rate", "min_heldout_sft_fit_rate", "min_non_choice_pass_rate", "min_refusal_pass_rate",
                  "max_unsupported_claim_rate"}


def _coerce(name: str, raw: Any, like: Any) -> Any:
    if name in OPTIONAL_RATES:
        if raw is None or (isinstance(raw, str) and raw.lower() in ("null", "none", "")):
            return None
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"gate setting {name} must be a number or null, got {raw!r}") from None
    if name == "min_category_pass_rate":
        if isinstance(raw, str):  # --set min_category_pass_rate=identity:0.6,math:0.3
            raw = dict(part.split(":", 1) for part in raw.split(",") if part.strip())
        if not isinstance(raw, dict):
            raise ValueError(f"gate setting {name} must map categories to rates, got {raw!r}")
        return {str(k).strip(): float(v) for k, v in raw.items()}
    if name == "warn_checks":
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"gate setting {name} must be a list of check names, got {raw!r}")
        return tuple(str(x).strip() for x in items if str(x).strip())
    if isinstance(like, bool):
        if isinstance(raw, str):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"gate setting {name} must be true or false, got {raw!r}")
            return raw.lower() in ("true", "1", "yes")
        return bool(raw)
    try:
        return type(like)(raw)
    except (TypeError, ValueError):
        raise ValueError(f"gate setting {name} must be a {type(like).__name__}, got {raw!r}") from None


def available_profiles() -> list[str]:
    return sorted(p.stem for p in GATE_CONFIG_DIR.glob("*.yaml"))


def load_gate_profile(profile: str | Path | None = None, overrides: dict[str, Any] | None = None) -> GateProfile:
    """A named profile (configs/gate/NAME.yaml) or a YAML path, then `overrides` (e.g. from --set)."""
    profile = profile or "default"
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = GATE_CONFIG_DIR / f"{profile}.yaml"
        if not path.exists():
            raise ValueError(f"unknown gate profile {str(profile)!r}; available: {', '.join(available_profiles())} "
                             f"(or give a .yaml path)")
    if not path.exists():
        raise FileNotFoundError(f"gate profile not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise DataError(path, None, None, "a gate profile is a mapping of threshold names to values")
    raw.setdefault("name", path.stem)
    raw.update(overrides or {})
    defaults = GateProfile()
    known = {f.name for f in fields(GateProfile)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown gate settings {unknown}; known: {', '.join(sorted(known - {'name'}))}")
    return GateProfile(**{k: v if k == "name" else _coerce(k, v, getattr(defaults, k)) for k, v in raw.items()})


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------------------------- checks


def _read(run_dir: Path, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """(parsed JSON, None) or (None, why it is unusable)."""
    path = run_dir / EVIDENCE[key]
    if not path.exists():
        return None, f"missing evidence: {EVIDENCE[key]}"
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return None, f"unreadable evidence: {EVIDENCE[key]} ({exc.msg})"
    if not isinstance(obj, dict):
        return None, f"unreadable evidence: {EVIDENCE[key]} is not a JSON object"
    return obj, None


def _line(name: str, value: Any, threshold: Any, ok: bool, reason: str) -> dict[str, Any]:
    # "block" until the profile's severity is applied (gate_checks): a failed check may only warn.
    return {"name": name, "value": value, "threshold": threshold, "verdict": "pass" if ok else "block",
            "reason": reason}


def _rows(run_dir: Path, rel: str) -> list[dict[str, Any]]:
    return read_jsonl_objects(run_dir / rel)


def _with_interval(check: dict[str, Any], flags: list[bool], samples: int, seed: int = 0) -> dict[str, Any]:
    """Attach the 95% bootstrap interval of a rate measured on these per-row outcomes."""
    if flags and samples > 0:
        import numpy as np

        from picochat_jax.eval.external import bootstrap_interval

        lo, hi = bootstrap_interval(np.asarray(flags, float), samples, seed)
        check["interval"] = [round(lo, 4), round(hi, 4)]
    return check


def _missing(name: str, threshold: Any, why: str) -> dict[str, Any]:
    return _line(name, None, threshold, False, why)


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _at_least(name: str, value: Any, threshold: float, what: str) -> dict[str, Any]:
    v = _number(value)
    if v is None:
        return _missing(name, f">= {threshold}", f"{what} was not recorded")
    ok = v >= threshold
    return _line(name, round(v, 4), f">= {threshold}", ok,
                 f"{what} {v:.3g} {'meets' if ok else 'is under'} the minimum {threshold}")


def _at_most(name: str, value: Any, threshold: float, what: str) -> dict[str, Any]:
    v = _number(value)
    if v is None:
        return _missing(name, f"<= {threshold}", f"{what} was not recorded")
    ok = v <= threshold
    return _line(name, round(v, 4), f"<= {threshold}", ok,
                 f"{what} {v:.3g} {'is within' if ok else 'exceeds'} the maximum {threshold}")


EXTERNAL_CHOICE_SUMMARY = "external_eval/external_summary.json"  # eval/external.py (multiple choice)


def _external_expected(run_dir: Path) -> bool:
    cfg_path = run_dir / "run_config.json"
    if (run_dir / EVIDENCE["external_eval"]).exists() or (run_dir / EXTERNAL_CHOICE_SUMMARY).exists():
        return True
    if not cfg_path.exists():
        return False
    try:
        pack_path = Path(json.loads(cfg_path.read_text()).get("pack", ""))
        return bool(pack_path.is_file() and json.loads(pack_path.read_text()).get("external_eval"))
    except (json.JSONDecodeError, OSError):
        return False


HF_SKIPPED = {"preflight", "sft_fit_f1", "sft_fit_rate", "heldout_sft_fit_rate", "eval_in_corpus",
              "memorization_rate"}  # a fine-tune of someone else's model has no corpus, preflight or SFT replay


HF_REPORTS = {"hf-sft": "hf_sft_report.json", "hf-dpo": "hf_dpo_report.json"}


def hf_report(run_dir: Path) -> dict[str, Any]:
    """The report of an hf-sft or hf-dpo out-dir ({} when there is none)."""
    for name in HF_REPORTS.values():
        if (run_dir / name).exists():
            return read_json_object(run_dir / name)
    return {}


def hf_gate_checks(run_dir: Path, profile: GateProfile) -> list[dict[str, Any]]:
    """The gate for a `train hf-sft` out-dir: its report for training, and the eval, external eval and honesty
    evidence `picochat gate --eval-input` builds there (hf/release.py)."""
    report = hf_report(run_dir)
    finite = all(_number(report.get(k)) is not None for k in ("final_train_loss",))
    ok = report.get("status") == "completed" and finite
    training = _line("training", report.get("status"), "completed", ok,
                     f"{report.get('stage', 'hf-sft')} finished {report.get('steps')} steps, final train loss "
                     f"{_fmt(report.get('final_train_loss'))}, best val loss {_fmt(report.get('best_val_loss'))}"
                     if ok else f"{report.get('stage', 'hf-sft')} status {report.get('status')!r} (its report)")
    checks = [c for c in gate_checks(run_dir, profile) if c["name"] not in HF_SKIPPED]
    training["verdict"] = "pass" if ok else profile.severity("training")
    return [training, *[c for c in checks if c["name"] != "training"]]


def gate_checks(run_dir: Path, profile: GateProfile) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    pre, why = _read(run_dir, "preflight")
    if pre is None:
        checks.append(_missing("preflight", "no blocking checks", why))
    else:
        blocking = pre.get("blocking") or []
        warnings = pre.get("warnings") or []
        if blocking and not profile.allow_preflight_override:
            how = " and was overridden with --allow-preflight-warnings" if pre.get("overridden") else ""
            checks.append(_line("preflight", pre.get("status"), "no blocking checks", False,
                                f"preflight blocked ({', '.join(blocking)}){how}"))
        else:
            checks.append(_line("preflight", pre.get("status"), "no blocking checks", True,
                                "preflight passed" + (f" with warnings ({', '.join(warnings)})" if warnings else "")
                                + (f"; blocking checks overridden ({', '.join(blocking)})" if blocking else "")))

    summary, why = _read(run_dir, "summary")
    if summary is None:
        checks.append(_missing("training", "completed", why))
    else:
        stages = ["base", "sft"] + (["dpo"] if "dpo" in summary else [])
        losses = {s: (summary.get(s) or {}).get("final_loss") for s in stages}
        finite = all(_number(x) is not None for x in losses.values())
        ok = summary.get("status") == "completed" and finite
        checks.append(_line("training", summary.get("status"), "completed", ok,
                            f"{', '.join(stages)} finished with finite losses" if ok else
                            f"training status {summary.get('status')!r}, final losses {losses}"))

    fit, why = _read(run_dir, "sft_fit")
    checks.append(_missing("sft_fit_f1", f">= {profile.min_sft_fit_f1}", why) if fit is None else
                  _at_least("sft_fit_f1", fit.get("mean_f1"), profile.min_sft_fit_f1,
                            "mean word F1 on replayed SFT rows"))

    ev, why = _read(run_dir, "eval")
    if ev is None:
        for name, thr in (("eval_rows", f">= {profile.min_eval_rows}"),
                          ("eval_pass_rate", f">= {profile.min_eval_pass_rate}"),
                          ("prompt_echo_rate", f"<= {profile.max_prompt_echo_rate}"),
                          ("answerable_refusal_rate", f"<= {profile.max_answerable_refusal_rate}")):
            checks.append(_missing(name, thr, why))
    else:
        checks.append(_at_least("eval_rows", ev.get("rows"), profile.min_eval_rows, "held-out eval rows"))
        eval_rows = _rows(run_dir, "eval/eval_results.jsonl")
        samples = profile.ci_bootstrap_samples
        checks.append(_with_interval(_at_least("eval_pass_rate", ev.get("pass_rate"), profile.min_eval_pass_rate,
                                               "held-out eval pass rate"), [bool(r["pass"]) for r in eval_rows],
                                     samples))
        checks.append(_with_interval(_at_most("prompt_echo_rate", ev.get("prompt_echo_rate"),
                                              profile.max_prompt_echo_rate, "prompt echo rate"),
                                     [bool(r.get("prompt_echo")) for r in eval_rows], samples))
        answerable = ev.get("answerable") or {}
        if answerable.get("rows", 0) == 0:
            checks.append(_line("answerable_refusal_rate", None, f"<= {profile.max_answerable_refusal_rate}", True,
                                "no answerable eval rows to over-refuse"))
        else:
            checks.append(_at_most("answerable_refusal_rate", answerable.get("refusal_rate"),
                                   profile.max_answerable_refusal_rate, "refusal rate on answerable rows"))

    hon, why = _read(run_dir, "honesty")
    if hon is None:
        for name, thr in (("eval_in_sft", f"<= {profile.max_eval_rows_in_sft}"),
                          ("eval_in_corpus", f"<= {profile.max_eval_rows_in_corpus}"),
                          ("memorization_rate", f"<= {profile.max_memorization_rate}")):
            checks.append(_missing(name, thr, why))
    else:
        counts = hon.get("counts") or {}
        for name, part, limit, where in (("eval_in_sft", "sft", profile.max_eval_rows_in_sft, "SFT rows"),
                                         ("eval_in_corpus", "corpus", profile.max_eval_rows_in_corpus, "corpus")):
            key = f"eval_rows_in_{part}"
            lines = hon.get(f"eval_lines_in_{part}") or hon.get("contaminated_eval_lines") or []
            n = counts.get(key)
            if not isinstance(n, int):
                checks.append(_missing(name, f"<= {limit}", f"honesty report has no {key} count"))
                continue
            ok = n <= limit
            checks.append(_line(name, n, f"<= {limit}", ok,
                                f"{n} eval rows found in the {where}" + ("" if ok else
                                f" (eval lines {', '.join(map(str, lines[:10]))}): the score measures recall")))
        mem = hon.get("memorization")
        if not mem:
            checks.append(_missing("memorization_rate", f"<= {profile.max_memorization_rate}",
                                   "memorisation was not measured"))
        else:
            checks.append(_at_most("memorization_rate", mem.get("rate"), profile.max_memorization_rate,
                                   f"share of {mem.get('canaries')} canaries completed verbatim"))

    choice_summary = run_dir / EXTERNAL_CHOICE_SUMMARY
    if choice_summary.exists():  # multiple choice: its accuracy is the external pass rate
        acc = json.loads(choice_summary.read_text()).get("acc")
        checks.append(_at_least("external_pass_rate", acc, profile.min_external_pass_rate,
                                "external multiple-choice accuracy"))
    elif _external_expected(run_dir) or profile.require_external:
        ext, why = _read(run_dir, "external_eval")
        checks.append(_missing("external_pass_rate", f">= {profile.min_external_pass_rate}", why) if ext is None else
                      _at_least("external_pass_rate", ext.get("pass_rate"), profile.min_external_pass_rate,
                                "external benchmark pass rate"))
    checks += _release_checks(run_dir, profile, fit, ev)
    for c in checks:
        if c["verdict"] == "block":
            c["verdict"] = profile.severity(c["name"])
    return checks


def _release_checks(run_dir: Path, profile: GateProfile, fit: dict[str, Any] | None,
                    ev: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The original picochat's release checks, each only when the profile sets its threshold."""
    out: list[dict[str, Any]] = []
    n = profile.ci_bootstrap_samples
    fit_rows = _rows(run_dir, "sft_fit/fit_results.jsonl")
    eval_rows = _rows(run_dir, "eval/eval_results.jsonl")
    if profile.min_sft_fit_rate is not None:
        thr = profile.min_sft_fit_rate
        out.append(_missing("sft_fit_rate", f">= {thr}", "missing evidence: sft_fit/fit_report.json") if fit is None
                   else _with_interval(_at_least("sft_fit_rate", fit.get("reproduced_rate"), thr,
                                                 "share of SFT rows reproduced exactly"),
                                       [bool(r.get("reproduced")) for r in fit_rows], n))
    if profile.min_heldout_sft_fit_rate is not None:
        thr = profile.min_heldout_sft_fit_rate
        held = read_json_object(run_dir / HELDOUT_FIT) if (run_dir / HELDOUT_FIT).exists() else None
        if held is None or not held.get("rows"):
            out.append(_missing("heldout_sft_fit_rate", f">= {thr}",
                                f"no held-out SFT fit ({HELDOUT_FIT}): the run held no SFT rows out"))
        else:
            out.append(_with_interval(_at_least("heldout_sft_fit_rate", held.get("reproduced_rate"), thr,
                                                "share of held-out SFT rows reproduced exactly"),
                                      [bool(r.get("reproduced")) for r in
                                       _rows(run_dir, "sft_fit/heldout/fit_results.jsonl")], n))
    if ev is None:
        for name, thr in (("non_choice_pass_rate", profile.min_non_choice_pass_rate),
                          ("refusal_pass_rate", profile.min_refusal_pass_rate),
                          ("unsupported_claim_rate", profile.max_unsupported_claim_rate)):
            if thr is not None:
                out.append(_missing(name, thr, "missing evidence: eval/eval_report.json"))
        for cat, thr in profile.min_category_pass_rate.items():
            out.append(_missing(f"category:{cat}", f">= {thr}", "missing evidence: eval/eval_report.json"))
        return out
    if profile.min_non_choice_pass_rate is not None:
        thr = profile.min_non_choice_pass_rate
        group = ev.get("non_choice") or {}
        rows = int(group.get("rows") or 0)
        if rows < profile.min_non_choice_rows:
            out.append(_line("non_choice_pass_rate", group.get("pass_rate"), f">= {thr}", True,
                             f"{rows} non-choice eval rows, fewer than {profile.min_non_choice_rows}: not judged"))
        else:
            out.append(_with_interval(_at_least("non_choice_pass_rate", group.get("pass_rate"), thr,
                                                "pass rate on eval rows that are not multiple choice"),
                                      [bool(r["pass"]) for r in eval_rows if not r.get("choice")], n))
    if profile.min_refusal_pass_rate is not None:
        thr = profile.min_refusal_pass_rate
        group = ev.get("unanswerable") or {}
        if not group.get("rows"):
            out.append(_missing("refusal_pass_rate", f">= {thr}", "no unanswerable eval rows to refuse"))
        else:
            out.append(_with_interval(_at_least("refusal_pass_rate", group.get("pass_rate"), thr,
                                                "pass rate on unanswerable (refusal/boundary) rows"),
                                      [bool(r["pass"]) for r in eval_rows if not r.get("answerable", True)], n))
    if profile.max_unsupported_claim_rate is not None:
        out.append(_with_interval(_at_most("unsupported_claim_rate", ev.get("unsupported_claim_rate"),
                                           profile.max_unsupported_claim_rate,
                                           "share of eval rows where an unanswerable question got an answer"),
                                  [not r.get("answerable", True) and not r.get("refusal") for r in eval_rows], n))
    by_cat = ev.get("by_category") or {}
    for cat, thr in profile.min_category_pass_rate.items():
        name = f"category:{cat}"
        if cat not in by_cat or not by_cat[cat].get("rows"):
            out.append(_missing(name, f">= {thr}", f"no eval rows of category {cat!r}: the skill is not covered"))
        else:
            out.append(_with_interval(_at_least(name, by_cat[cat].get("pass_rate"), thr,
                                                f"pass rate on {cat} rows"),
                                      [bool(r["pass"]) for r in eval_rows if r.get("category") == cat], n))
    return out


def evaluate_gate(run_dir: str | Path, profile: GateProfile | None = None) -> dict[str, Any]:
    """Decide approved/warn/blocked for a run folder; write release/gate.json and release/release_card.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    profile = profile or load_gate_profile()
    from picochat_jax.outdir import read_marker

    kind = (read_marker(run_dir) or {}).get("kind")
    hf = kind in HF_REPORTS
    checks = hf_gate_checks(run_dir, profile) if hf else gate_checks(run_dir, profile)
    blocking = [c["name"] for c in checks if c["verdict"] == "block"]
    warnings = [c["name"] for c in checks if c["verdict"] == "warn"]
    candidate = _candidate(run_dir)
    gate = {
        "decision": "blocked" if blocking else ("warn" if warnings else "approved"),
        "warnings": warnings,
        "run_dir": str(run_dir.absolute()),
        "model": candidate,
        "profile": {"name": profile.name, **profile.thresholds()},
        "checks": checks,
        "blocking": blocking,
        "kind": kind if hf else "run",
        "evidence": {k: (v if (run_dir / v).exists() else None) for k, v in
                     ({**EVIDENCE, "hf_report": HF_REPORTS[kind]} if hf else EVIDENCE).items()
                     if (k != "external_eval" or _external_expected(run_dir))
                     and not (hf and k in ("preflight", "summary", "sft_fit"))},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_json(run_dir / "release" / "gate.json", gate)
    save_text(run_dir / "release" / "release_card.md", release_card(run_dir, gate))
    return gate


def _candidate(run_dir: Path) -> str | None:
    """The model a release would ship: the one the run judged (summary.json), else DPO if present, else SFT;
    an hf-sft folder ships final_model/."""
    if hf_report(run_dir) and (run_dir / "final_model").is_dir():
        return "final_model"
    named = read_json_object(run_dir / "summary.json").get("candidate")
    if isinstance(named, str) and (run_dir / named / "model_config.json").exists():
        return named
    for stage in ("dpo", "sft"):
        if (run_dir / stage / "checkpoint" / "model_config.json").exists():
            return f"{stage}/checkpoint"
    return None


# --------------------------------------------------------------------------------------------- card




def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def gate_table(gate: dict[str, Any]) -> list[str]:
    lines = ["| check | verdict | value | 95% interval | threshold | reason |", "|---|---|---:|---:|---:|---|"]
    for c in gate["checks"]:
        interval = "–".join(f"{x:.3g}" for x in c["interval"]) if c.get("interval") else ""
        lines.append(f"| {c['name']} | {c['verdict'].upper()} | {_fmt(c['value'])} | {interval} | "
                     f"{c['threshold']} | {str(c['reason']).replace('|', '/')} |")
    return lines


def release_card(run_dir: Path, gate: dict[str, Any]) -> str:
    summary = read_json_object(run_dir / "summary.json")
    cfg = read_json_object(run_dir / "run_config.json")
    manifest = read_json_object(run_dir / "corpus_manifest.json")
    ev = read_json_object(run_dir / EVIDENCE["eval"])
    hon = read_json_object(run_dir / EVIDENCE["honesty"])
    model_cfg = read_json_object(run_dir / (gate["model"] or "sft/checkpoint") / "model_config.json")
    decision = gate["decision"].upper()
    lines = [f"# Release card: {summary.get('pack', cfg.get('pack', run_dir.name))}", "",
             f"**Decision: {decision}** (gate profile `{gate['profile']['name']}`). "
             + ("Every check passed." if gate["decision"] == "approved" else
                f"Approved with warnings: {', '.join(gate['warnings'])}. Read them before relying on it."
                if gate["decision"] == "warn" else
                f"Blocked by: {', '.join(gate['blocking'])}. A finished run is not a release."), "",
             "## Model", "",
             (f"- checkpoint: `{gate['model'] or 'none'}` (self-contained: params, `model_config.json` and "
              f"`tokenizer.json`; `picochat eval chat --checkpoint` and `picochat serve` load it alone)")]
    if model_cfg:
        lines.append(f"- architecture: {model_cfg.get('n_layers')} layers, d_model {model_cfg.get('d_model')}, "
                     f"{model_cfg.get('n_heads')} heads ({model_cfg.get('n_kv_heads')} kv), context "
                     f"{model_cfg.get('max_seq_len')}, vocab {model_cfg.get('vocab_size')}, {model_cfg.get('norm')}, "
                     f"{model_cfg.get('position')} positions, {model_cfg.get('activation')}")
    if summary:
        lines.append(f"- parameters: {summary.get('params', 0):,}; scale `{summary.get('scale')}`; "
                     f"mesh {summary.get('mesh')} on {summary.get('device_kind')}")
        for stage in ("base", "sft", "dpo"):
            s = summary.get(stage)
            if isinstance(s, dict):
                lines.append(f"- {stage}: {s.get('steps')} steps, loss {_fmt(s.get('first_loss'))} -> "
                             f"{_fmt(s.get('final_loss'))}" + (f", {s.get('tokens_seen', 0):,} tokens"
                                                               if s.get('tokens_seen') else ""))
    lines += ["", "## Data", ""]
    if manifest:
        lines.append(f"- corpus: {manifest.get('total_documents')} documents, {manifest.get('total_bytes', 0):,} "
                     f"bytes from {manifest.get('total_files')} files (sha256 in corpus_manifest.json)")
    counts = hon.get("counts") or {}
    if counts:
        lines.append(f"- SFT rows: {counts.get('sft_rows')}; eval rows: {counts.get('eval_rows')} "
                     f"({counts.get('eval_rows_contaminated')} found in training data)")
    lines += ["", "## Evaluation", ""]
    if ev:
        lines.append(f"- held-out pass rate {_fmt(ev.get('pass_rate'))} over {ev.get('rows')} rows; prompt echo "
                     f"{_fmt(ev.get('prompt_echo_rate'))}; refusals {_fmt(ev.get('refusal_rate'))}")
        for cat, g in (ev.get("by_category") or {}).items():
            lines.append(f"  - {cat}: {g.get('passed')}/{g.get('rows')}")
    else:
        lines.append("- no held-out eval report")
    mem = hon.get("memorization") or {}
    if mem:
        lines.append(f"- memorisation: {mem.get('memorized')} of {mem.get('canaries')} canaries completed verbatim")
    lines += ["", "## Gate", "", *gate_table(gate), "",
              "## Intended use and limits", "",
              ("A small model trained from scratch for learning and experiments. It makes mistakes, can state "
              "false things fluently and knows only what its corpus and SFT rows contained. Scores above are on "
              "the pack's own held-out rows; they say nothing about other tasks."), "",
              "## Evidence", ""]
    for key, rel in gate["evidence"].items():
        lines.append(f"- {key}: " + (f"[{rel}](../{rel})" if rel else "missing"))
    return "\n".join(lines) + "\n"
