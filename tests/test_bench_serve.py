"""tools/bench_serve.py on CPU with a tiny model: the server comes up, every level's requests get exactly the
tokens they asked for, and the latency figures are filled in. GPU figures come from running the tool there."""

from __future__ import annotations

import pytest

TINY = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "512",
        "--streams", "1,3", "--requests-per-stream", "2", "--prompt-len", "8", "--min-out", "4", "--max-out", "12",
        "--max-len", "64", "--max-batch", "4", "--precision", "fp32", "--peer", "none"]


@pytest.mark.slow
def test_serving_levels_on_cpu(load_tool, tmp_path):
    bench = load_tool("bench_serve")
    report = bench.main([*TINY, "--json-out", str(tmp_path / "serve.json")])
    levels = report["ours"]["levels"]
    assert [lv["streams"] for lv in levels] == [1, 3] and [lv["requests"] for lv in levels] == [2, 6]
    for lv in levels:
        assert lv["output_tokens"] == lv["asked_tokens"] > 0  # every reply ran to its max_tokens, counted exactly
        assert lv["output_tokens_per_sec"] > 0 and 0 < lv["ttft_ms_p50"] <= lv["ttft_ms_p99"]
    assert report["ours"]["health"]["max_batch_seen"] >= 2  # the 3-stream level decoded requests together
    assert (tmp_path / "serve.json").is_file()
