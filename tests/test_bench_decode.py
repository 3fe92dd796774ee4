"""tools/bench_decode.py on CPU with a tiny model: every variant, window and live-slot count gets a step time,
and the unroll value (a stacked scan's, or the per-layer loop) reaches the engine's model. GPU figures come from
running the tool there."""

from __future__ import annotations

TINY = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "512",
        "--slots", "4", "--prompt-len", "8", "--windows", "32,64", "--max-len", "64", "--chunks", "2",
        "--unroll", "1,2,loop", "--precision", "fp32"]


def test_decode_steps_timed_per_variant(load_tool, tmp_path):
    bench = load_tool("bench_decode")
    report = bench.main([*TINY, "--json-out", str(tmp_path / "decode.json")])
    assert [(v["scan_unroll"], v["layer_loop"]) for v in report["variants"]] == [(1, False), (2, False), (1, True)]
    for variant in report["variants"]:
        assert set(variant["slots"]) == {"4", "1"}
        for live in variant["slots"].values():
            assert [w["window"] for w in live["windows"]] == [32, 64]
            assert all(w["ms_per_step"] > 0 for w in live["windows"])
        assert variant["engine_run"]["ms_per_step"] > 0
    assert (tmp_path / "decode.json").is_file()
