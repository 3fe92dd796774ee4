"""Data-path benchmark: tokenizing a large corpus into shards, reading the shards back, and the memory of both.

Makes a synthetic corpus (Zipf-distributed words from a generated lexicon, documents of varied length, JSONL
files), trains a BPE tokenizer on a bounded sample, then measures in one run on the same cores:

1. raw `tokenizers` `encode_batch` over the corpus (text already in memory, only the encode timed), against
   `picochat data tokenize` end to end (counting pass, reading, encoding, writing, checksums), and the peak RSS
   of the tokenize process;
2. the shard loader: building the best-fit row plan, then `BatchSource.batch(step)` throughput in tokens/s on
   one core;
3. peak RSS of a short `train base --shards` run on the large shards against the same run on 10 MB shards.

    python tools/bench_data.py --corpus-mb 1024 --out docs/results/2026-11-30-data   # about 15 min on 2 cores
    python tools/bench_data.py --corpus-mb 8 --small-mb 2 --out /tmp/bench_data       # a quick smoke run

Figures land in OUT/bench_data.json and OUT/bench_data.md; the corpus and shards go to --work (deleted after
unless --keep).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS_PER_FILE = 4096


def make_corpus(folder: Path, megabytes: float, seed: int = 0) -> dict[str, int]:
    """JSONL files of synthetic documents, about `megabytes` MB in all; deterministic for a seed. Words follow a
    Zipf law over a 50,000-word generated lexicon (a long tail, like real text, so the tokenizer's word cache
    does not make encoding artificially cheap); one word in 14 ends a sentence."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = np.linspace(2.0, 0.2, len(letters))
    weights /= weights.sum()
    words = ["".join(rng.choice(letters, int(rng.integers(1, 11)), p=weights)) for _ in range(50_000)]
    lexicon = np.array(words + [w + "." for w in words], dtype=object)
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    probs = np.concatenate([zipf * 13 / 14, zipf / 14])
    cdf = np.cumsum(probs / probs.sum())
    folder.mkdir(parents=True, exist_ok=True)
    target = int(megabytes * 1e6)
    written, docs, files = 0, 0, 0
    while written < target:
        lengths = rng.lognormal(6.2, 0.9, ROWS_PER_FILE).astype(np.int64) + 8
        ids = np.minimum(np.searchsorted(cdf, rng.random(int(lengths.sum()))), len(lexicon) - 1)
        tokens = lexicon[ids].tolist()
        rows, at = [], 0
        for n in lengths.tolist():
            text = " ".join(tokens[at:at + n])
            at += n
            rows.append(json.dumps({"text": text}) + "\n")
            written += len(text) + 12
            docs += 1
            if written >= target:
                break
        (folder / f"part-{files:05d}.jsonl").write_text("".join(rows))
        files += 1
    return {"files": files, "documents": docs, "bytes": sum(f.stat().st_size for f in folder.glob("*.jsonl"))}


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, output) of a child process, its RSS from the kernel's accounting."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss * 1024, out


def raw_encode_seconds(corpus: Path, tokenizer_path: Path) -> dict[str, float]:
    """Seconds spent inside `encode_batch` and inside `encode_batch_fast` (no character offsets, what `data
    tokenize` calls) over the corpus, alternating per chunk so both see the same machine state; reading is not
    timed. Returns both, with tokens and bytes."""
    from tokenizers import Tokenizer

    from picochat_jax.data.pack import read_documents

    tok = Tokenizer.from_file(str(tokenizer_path))
    seconds = {"encode_batch": 0.0, "encode_batch_fast": 0.0}
    tokens, size = 0, 0
    for path in sorted(corpus.glob("*.jsonl")):
        texts = read_documents(path)
        size += sum(len(t.encode("utf-8")) for t in texts)
        for lo in range(0, len(texts), 1024):
            chunk = texts[lo:lo + 1024]
            for method in seconds:
                t0 = time.perf_counter()
                enc = getattr(tok, method)(chunk, add_special_tokens=False)
                seconds[method] += time.perf_counter() - t0
            tokens += sum(len(e.ids) for e in enc)
    return {**seconds, "tokens": tokens, "bytes": size}


def loader_throughput(shards: Path, seq_len: int, batch: int, steps: int) -> dict[str, float]:
    from picochat_jax.data.loader import BatchSource
    from picochat_jax.data.shards import PackedRows, TokenShards

    t0 = time.perf_counter()
    rows = PackedRows(TokenShards(shards, "train"), seq_len)
    plan_sec = time.perf_counter() - t0
    source = BatchSource(rows, batch, 1, seed=0)
    source.batch(0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        source.batch(step * 7919 % max(1, len(rows) // batch))
    sec = time.perf_counter() - t0
    return {"plan_sec": plan_sec, "rows": len(rows), "tokens_per_sec": steps * batch * seq_len / sec,
            "batch": batch, "seq_len": seq_len, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus-mb", type=float, default=1024)
    ap.add_argument("--small-mb", type=float, default=10, help="The small corpus of the train-base RSS comparison.")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temp folder).")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    picochat = [str(Path(sys.executable).parent / "picochat")]
    result: dict = {"date": dt.date.today().isoformat(), "machine": platform.platform(),
                    "cpu_cores": os.cpu_count(), "python": platform.python_version()}
    import tokenizers

    result["tokenizers"] = tokenizers.__version__
    try:
        t0 = time.perf_counter()
        big = make_corpus(work / "big", args.corpus_mb, seed=0)
        small = make_corpus(work / "small", args.small_mb, seed=1)
        result["corpus"] = {"big": big, "small": small, "make_sec": time.perf_counter() - t0}
        print(f"corpus: {big['bytes'] / 1e6:,.0f} MB in {big['files']} files, {big['documents']:,} documents")

        tok_path = work / "tokenizer.json"
        wall, rss, _ = run_measured([*picochat, "tokenizer", "train", "--input", str(work / "big"), "--out",
                                     str(tok_path), "--vocab-size", str(args.vocab_size), "--max-bytes",
                                     str(64 << 20)])
        result["tokenizer_train"] = {"wall_sec": wall, "peak_rss_mb": rss / 2**20, "sample_bytes": 64 << 20}

        raw = raw_encode_seconds(work / "big", tok_path)
        raw_bytes = raw["bytes"]
        result["raw_encode"] = {**raw, "mb_per_sec": raw_bytes / raw["encode_batch"] / 1e6,
                                "fast_mb_per_sec": raw_bytes / raw["encode_batch_fast"] / 1e6}
        print(f"raw encode_batch: {result['raw_encode']['mb_per_sec']:.2f} MB/s, encode_batch_fast: "
              f"{result['raw_encode']['fast_mb_per_sec']:.2f} MB/s ({raw['tokens']:,} tokens)")

        wall, rss, _ = run_measured([*picochat, "data", "tokenize", str(work / "big"), "--tokenizer", str(tok_path),
                                     "--out-dir", str(work / "shards_big"), "--no-progress"])
        manifest = json.loads((work / "shards_big" / "manifest.json").read_text())
        tokens = sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))
        result["tokenize"] = {"wall_sec": wall, "peak_rss_mb": rss / 2**20, "mb_per_sec": raw_bytes / wall / 1e6,
                              "tokens": tokens, "documents": manifest["documents"],
                              "shards": sum(len(manifest["splits"][s]["shards"]) for s in ("train", "val")),
                              "vs_raw": raw["encode_batch"] / wall, "vs_raw_fast": raw["encode_batch_fast"] / wall}
        print(f"data tokenize: {raw_bytes / wall / 1e6:.2f} MB/s end to end, "
              f"{result['tokenize']['vs_raw']:.1%} of raw encode_batch, {result['tokenize']['vs_raw_fast']:.1%} of "
              f"raw encode_batch_fast; peak RSS {rss / 2**20:,.0f} MB")

        result["loader"] = loader_throughput(work / "shards_big", seq_len=1024, batch=32, steps=200)
        print(f"loader: {result['loader']['tokens_per_sec'] / 1e6:.1f}M tokens/s on one core "
              f"(plan {result['loader']['plan_sec']:.1f} s for {result['loader']['rows']:,} rows)")

        run_measured([*picochat, "data", "tokenize", str(work / "small"), "--tokenizer", str(tok_path),
                      "--out-dir", str(work / "shards_small"), "--no-progress"])
        train_rss = {}
        for name in ("small", "big"):
            wall, rss, _ = run_measured([*picochat, "train", "base", "--shards", str(work / f"shards_{name}"),
                                         "--tokenizer", str(tok_path), "--out-dir", str(work / f"train_{name}"),
                                         "--scale", "smoke", "--steps", str(args.train_steps), "--no-progress",
                                         "--device", "cpu"])
            train_rss[name] = {"wall_sec": wall, "peak_rss_mb": rss / 2**20}
        train_rss["difference_mb"] = train_rss["big"]["peak_rss_mb"] - train_rss["small"]["peak_rss_mb"]
        result["train_base_rss"] = train_rss
        print(f"train base peak RSS: {train_rss['small']['peak_rss_mb']:,.0f} MB on {args.small_mb:g} MB, "
              f"{train_rss['big']['peak_rss_mb']:,.0f} MB on {args.corpus_mb:g} MB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_data.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench_data.md").write_text(markdown(result, args))
    print(f"-> {args.out / 'bench_data.md'}")


def markdown(r: dict, args: argparse.Namespace) -> str:
    tk, raw, ld, tr = r["tokenize"], r["raw_encode"], r["loader"], r["train_base_rss"]
    return "\n".join([
        f"# Data path benchmark ({r['date']}, {r['cpu_cores']} CPU cores, tokenizers {r['tokenizers']})", "",
        f"Command: `python tools/bench_data.py --corpus-mb {args.corpus_mb:g} --small-mb {args.small_mb:g} "
        f"--out {args.out}`", "",
        f"Corpus: {r['corpus']['big']['bytes'] / 1e6:,.0f} MB of synthetic JSONL, "
        f"{r['corpus']['big']['documents']:,} documents; BPE vocab {args.vocab_size}.", "",
        "| measure | value |", "|---|---:|",
        f"| raw `encode_batch` (encode only, the corpus in memory) | {raw['mb_per_sec']:.2f} MB/s |",
        f"| raw `encode_batch_fast` (no offsets; what `data tokenize` calls) | {raw['fast_mb_per_sec']:.2f} MB/s |",
        f"| `data tokenize` end to end (count, read, encode, write, sha256) | {tk['mb_per_sec']:.2f} MB/s: "
        f"{tk['vs_raw']:.1%} of `encode_batch`, {tk['vs_raw_fast']:.1%} of `encode_batch_fast` |",
        f"| tokens written | {tk['tokens']:,} in {tk['shards']} shards |",
        f"| peak RSS while tokenizing | {tk['peak_rss_mb']:,.0f} MB |",
        f"| loader, one core (batch {ld['batch']} x {ld['seq_len']}) | {ld['tokens_per_sec'] / 1e6:.1f}M tokens/s |",
        f"| best-fit plan build | {ld['plan_sec']:.1f} s for {ld['rows']:,} rows |",
        f"| `train base` peak RSS, {args.small_mb:g} MB corpus | {tr['small']['peak_rss_mb']:,.0f} MB |",
        f"| `train base` peak RSS, {args.corpus_mb:g} MB corpus | {tr['big']['peak_rss_mb']:,.0f} MB |",
        f"| difference | {tr['difference_mb']:+,.0f} MB |", ""])


if __name__ == "__main__":
    main()
