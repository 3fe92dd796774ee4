"""The generation engine: KV-cache decoding against full recomputation, sampling, buckets, context limits."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picochat_jax.config import ModelConfig
from picochat_jax.data.records import Message
from picochat_jax.generate import (
    Engine,
    NativeChatFormat,
    SamplingParams,
    bucket_length,
    filter_logits,
)
from picochat_jax.model.transformer import init_params, make_model
from picochat_jax.tokenizer import train_tokenizer

# Two families that exercise different code paths: RoPE + GQA + qk-norm + SwiGLU, and GPT-2 style learned
# positions + LayerNorm + biases + tied embeddings. A large init_std keeps the logits far apart, so greedy
# argmax is decided by the model, not by float rounding.
CONFIGS = {
    "rope_gqa": ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                            norm="rmsnorm", position="rope", activation="swiglu", qk_norm=True, init_std=0.3),
    "learned_gpt2": ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                                max_seq_len=64, norm="layernorm", position="learned", activation="gelu",
                                tie_embeddings=True, qkv_bias=True, out_bias=True, mlp_bias=True, init_std=0.3),
}
PROMPT_LENGTHS = (1, 4, 9, 17, 30)


class Family:
    """One model family under test: config, module, params, a shared engine and a cache-free reference."""

    def __init__(self, name: str):
        self.cfg = CONFIGS[name]
        self.model = make_model(self.cfg)
        self.params = init_params(self.model, jax.random.key(7))
        self.engine = Engine(self.params, self.cfg)
        self._forward = jax.jit(lambda p, t: self.model.apply({"params": p}, t))

    def reference(self, prompt: list[int], steps: int) -> list[int]:
        """Greedy decoding without a cache, over the full context."""
        return greedy_by_full_forwards(lambda t: self._forward(self.params, t), prompt, steps, self.cfg.max_seq_len)


def greedy_by_full_forwards(forward: Any, prompt: list[int], steps: int, width: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence re-run for every new token.

    Sequences are right-padded to `width`, so one compiled `forward` ((1, width) ids -> (1, width, vocab)
    logits) serves every length; causal attention keeps the padding after a position from touching its logits.
    """
    ids = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(ids)] = ids
        ids.append(int(jnp.argmax(forward(padded)[0, len(ids) - 1])))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def families() -> dict[str, Family]:
    return {name: Family(name) for name in CONFIGS}


@pytest.fixture(scope="module")
def engine(families) -> Engine:
    """Engine-level behaviour (sampling, buckets, limits) does not depend on the family: test it once."""
    return families["rope_gqa"].engine


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, 97, n).tolist() for n in PROMPT_LENGTHS]


GREEDY = SamplingParams(max_new_tokens=10)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_kv_cache_greedy_matches_full_recomputation(families, family, prompts):
    engine, reference = families[family].engine, families[family].reference
    # One batch holding prompts of 1..30 tokens: all but the longest are left-padded.
    out = engine.generate(prompts, GREEDY, stop_ids=[])
    expected = [reference(p, 10) for p in prompts]
    assert out == expected
    # Batches of two (other buckets, other neighbours, a filler row): the same tokens.
    assert engine.generate(prompts, GREEDY, stop_ids=[], batch_size=2) == expected


@pytest.mark.parametrize("layer_loop", [None, False], ids=["layer_loop", "unrolled_scan"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_unrolled_layers_decode_the_same_tokens(families, family, prompts, layer_loop):
    """The server's engine unrolls the layers on GPU (`serve.backend.SERVE_SCAN_UNROLL`): fully unrolled, as a
    loop over per-layer params and caches (`Decoder.layer_loop`), or as an unrolled scan when asked. Both give
    the rolled engine's greedy replies, in a static batch and through slots."""
    fam = families[family]
    unrolled = Engine(fam.params, fam.cfg, max_batch=8, scan_unroll=fam.cfg.n_layers, layer_loop=layer_loop)
    assert fam.engine.model.scan_unroll == 1 and not fam.engine.model.layer_loop  # Engine's default: rolled
    if layer_loop is None:  # full unroll: the loop, with each layer's params and cache arrays its own
        assert unrolled.model.layer_loop and "layers" not in unrolled.params and "layers_0" in unrolled.params
        assert isinstance(unrolled.slots(stop_ids=()).cache["k"], tuple)
        # The server scores prompts (echo/logprobs) with the same engine: the loop's log-probabilities too.
        # XLA:GPU runs float32 matmuls with TF32 inputs by default, rounded differently in the loop's and the
        # scan's fusions (an H200 gave differences of 1.4e-4); on CPU they agree to 1e-4.
        atol = 1e-4 if jax.default_backend() == "cpu" else 1e-3
        for mine, rolled in zip(unrolled.score(prompts, top=3), fam.engine.score(prompts, top=3), strict=True):
            np.testing.assert_allclose(mine.logprobs[1:], rolled.logprobs[1:], atol=atol)
            assert [[i for i, _ in alts] for alts in mine.top[1:]] == [[i for i, _ in alts] for alts in rolled.top[1:]]
    else:
        assert unrolled.model.scan_unroll == fam.cfg.n_layers and not unrolled.model.layer_loop
    expected = [fam.reference(p, 10) for p in prompts]
    assert unrolled.generate(prompts, GREEDY, stop_ids=[]) == expected
    slots = unrolled.slots(stop_ids=())
    for slot, p in enumerate(prompts):
        slots.admit(slot, p, GREEDY)
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while slots.active():
        for slot, (tokens, _) in slots.step().items():
            got[slot].extend(tokens)
    assert [got[i] for i in range(len(prompts))] == expected


def test_stops_at_stop_token_and_drops_it(families, prompts):
    engine, ref = families["learned_gpt2"].engine, families["learned_gpt2"].reference(prompts[2], 10)
    cut = next(i for i in range(1, 10) if ref[i] not in ref[:i])
    out = engine.generate([prompts[2], prompts[3]], GREEDY, stop_ids=[ref[cut]])
    assert out[0] == ref[:cut]
    assert ref[cut] not in out[1]


def test_sampling_is_reproducible_and_top_k_one_is_greedy(engine, prompts):
    greedy = engine.generate(prompts, GREEDY, [])
    hot = SamplingParams(max_new_tokens=10, temperature=1.5, seed=3)
    first = engine.generate(prompts, hot, [])
    assert engine.generate(prompts, hot, []) == first
    # A row's sample does not depend on its batch neighbours.
    assert engine.generate(prompts[:2], hot, []) == first[:2]
    assert engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.5, seed=4), []) != first
    assert first != greedy
    top_k_one = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=1, seed=9)
    assert engine.generate(prompts, top_k_one, []) == greedy
    tiny_nucleus = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=1e-4, seed=9)
    assert engine.generate(prompts, tiny_nucleus, []) == greedy


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.int32(2), jnp.float32(1.0))))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    # Nucleus 0.7: 0.5 alone is under 0.7, so 0.3 joins; 0.8 is past it, so 0.15 stays out.
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.int32(0), jnp.float32(0.7))))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.int32(0), jnp.float32(1.0))))
    assert kept.all()


def test_prompt_buckets_bound_the_number_of_compiles(engine):
    sampling = SamplingParams(max_new_tokens=3)  # a budget no other test uses: a program of its own
    before = engine.compiled_programs
    for n in (3, 7, 12, 16):  # all in the 16-token bucket, batch of one: one prefill and one decode program
        engine.generate([list(range(1, n + 1))], sampling, [])
    assert engine.compiled_programs == before + 2
    engine.generate([list(range(1, 21))], sampling, [])  # 32-token bucket (and a longer cache)
    grown = engine.compiled_programs
    assert grown <= before + 4  # at most its own prefill and decode programs (others' may already exist)
    engine.generate([list(range(1, 25))], sampling, [])
    assert engine.compiled_programs == grown
    assert bucket_length(1, 64) == 16 and bucket_length(17, 64) == 32 and bucket_length(40, 48) == 48


def test_decode_windows_add_three_quarter_sizes_above_256():
    from picochat_jax.generate import decode_windows, window_length

    assert [window_length(n, 1024) for n in (9, 200, 257, 384, 385, 648, 769)] == [16, 256, 384, 384, 512, 768,
                                                                                    1024]
    assert window_length(900, 1000) == 1000 and window_length(600, 1000) == 750  # never above the cache
    assert decode_windows(1024, 8) == [16, 32, 64, 128, 256, 384, 512, 768, 1024]
    assert decode_windows(64, 3) == [16, 32, 64]
    for n in range(9, 1033):  # every reach a chunk can have gets a window the warmup compiled, covering it
        assert window_length(n, 1024) in decode_windows(1024, 8) and window_length(n, 1024) >= min(n, 1024)


def test_context_limit_truncates_prompts_from_the_left(families, engine):
    cfg, params = families["rope_gqa"].cfg, families["rope_gqa"].params
    sampling = GREEDY
    long_prompt = [int(t) for t in np.random.default_rng(1).integers(1, 97, 80)]
    with pytest.warns(UserWarning, match="lost their oldest tokens"):
        out = engine.generate([long_prompt], sampling, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.generate([long_prompt[-(64 - 10):]], sampling, []) == out
    with pytest.raises(ValueError, match="below the context"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=64), [])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Engine(params, cfg, max_len=65)
    small = Engine(params, cfg, max_len=24)
    with pytest.warns(UserWarning):
        assert len(small.generate([long_prompt], sampling, [])[0]) == 10


def test_bf16_engine_generates_in_vocab_tokens(families, prompts):
    cfg, params = families["rope_gqa"].cfg, families["rope_gqa"].params
    out = Engine(params, cfg, precision="bf16").generate(prompts, SamplingParams(max_new_tokens=6), [])
    assert [len(o) for o in out] == [6] * len(prompts)
    assert all(0 <= t < cfg.vocab_size for o in out for t in o)


def test_native_chat_format_round_trip():
    tok = train_tokenizer(["hello there, general chat"], "byte", 0)
    fmt = NativeChatFormat(tok)
    ids = fmt.encode_prompt([Message("system", "Be brief."), Message("user", "hi")])
    assert ids[0] == tok.bos_id and ids[-1] == tok.role_ids["assistant"]
    assert fmt.stop_ids == (tok.end_id,) and fmt.pad_id == tok.pad_id
    assert fmt.encode_text("hi")[0] == tok.bos_id
    assert fmt.decode(tok.encode("hello") + [tok.end_id]) == "hello"


def test_sampling_params_validate():
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=1.5)
    assert SamplingParams(top_p=0.0).top_p == 0.0  # OpenAI's range: 0 keeps only the most likely token
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


# ------------------------------------------------------------------------------------------ continuous batching


@pytest.mark.parametrize("name", list(CONFIGS))
def test_slots_decode_what_the_static_batch_decodes_with_requests_joining_mid_reply(name):
    """Requests admitted into slots between chunks, at different prompt lengths and reply positions, get the
    tokens the static engine gives them alone: greedy and seeded sampling alike."""
    from picochat_jax.generate import SlotBatch

    fam = Family(name)
    engine = Engine(fam.params, fam.cfg, max_batch=4, chunk_tokens=3)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 97, n).tolist() for n in (9, 3, 17, 5, 12)]
    sampling = [SamplingParams(max_new_tokens=14), SamplingParams(max_new_tokens=5),
                SamplingParams(max_new_tokens=9, temperature=0.8, top_k=20, seed=11),
                SamplingParams(max_new_tokens=7), SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=4)]
    alone = [engine.generate([p], s, stop_ids=())[0] for p, s in zip(prompts, sampling, strict=True)]
    slots = SlotBatch(engine, stop_ids=())
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    owner: dict[int, int] = {}
    waiting = list(range(len(prompts)))
    finished_order = []
    chunks = 0
    while waiting or owner:
        # one request joins per chunk while slots are free: prefill interleaved with decoding
        free = slots.free_slots()
        if waiting and free:
            i = waiting.pop(0)
            slots.admit(free[0], prompts[i], sampling[i])
            owner[free[0]] = i
        for slot, (tokens, reason) in slots.step().items():
            got[owner[slot]].extend(tokens)
            if reason is not None:
                assert reason == "length"
                finished_order.append(owner.pop(slot))
        chunks += 1
        assert chunks < 100
    assert [got[i] for i in range(len(prompts))] == alone
    assert finished_order.index(1) < finished_order.index(0)  # the short reply left before the long one ended


def test_slots_pipelined_one_chunk_ahead_give_the_same_replies():
    """The server's worker launches chunk N+1 before it collects chunk N: a slot that finishes in N is reused
    by a newcomer while N+1 is in flight, and a cancelled reply stops; every other reply is the one the engine
    gives alone, and the stale chunk gives the newcomer no tokens of its predecessor."""
    from picochat_jax.generate import SlotBatch

    fam = Family("rope_gqa")
    engine = Engine(fam.params, fam.cfg, max_batch=2, chunk_tokens=3)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, 97, n).tolist() for n in (6, 4, 11, 8)]
    sampling = [SamplingParams(max_new_tokens=n) for n in (4, 20, 9, 20)]
    alone = [engine.generate([p], s, stop_ids=())[0] for p, s in zip(prompts, sampling, strict=True)]
    slots = SlotBatch(engine, stop_ids=())
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    owner: dict[int, int] = {}
    waiting, reasons = [0, 1, 2, 3], {}
    in_flight, chunks = None, 0
    while waiting or owner:
        for slot in slots.free_slots():
            if waiting:
                i = waiting.pop(0)
                slots.admit(slot, prompts[i], sampling[i])
                owner[slot] = i
        if got[3] and 3 in owner.values():  # request 3 is cancelled while a chunk of it is in flight
            slot = next(k for k, v in owner.items() if v == 3)
            slots.release(slot)
            reasons[owner.pop(slot)] = "cancelled"
        launched = slots.launch()
        for slot, (tokens, reason) in slots.collect(in_flight).items():
            got[owner[slot]].extend(tokens)
            if reason is not None:
                reasons[owner.pop(slot)] = reason
        in_flight, chunks = launched, chunks + 1
        assert chunks < 100
    assert slots.collect(in_flight) == {}
    assert [got[i] for i in range(3)] == alone[:3]
    assert reasons == {0: "length", 1: "length", 2: "length", 3: "cancelled"}
    assert 0 < len(got[3]) < len(alone[3]) and got[3] == alone[3][:len(got[3])]


def test_prompts_prefilled_together_give_the_replies_each_gets_alone():
    """`admit_many` prefills several prompts in one program call (`prefill_rows` rows, filler rows dropped):
    each reply equals the one its prompt gets alone, and a slot already decoding is untouched by the filler."""
    from picochat_jax.generate import SlotBatch

    fam = Family("rope_gqa")
    engine = Engine(fam.params, fam.cfg, max_batch=6, chunk_tokens=4)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, 97, n).tolist() for n in (5, 17, 2, 9, 30, 12)]
    sampling = [SamplingParams(max_new_tokens=n, temperature=t, seed=i)
                for i, (n, t) in enumerate(zip((12, 6, 20, 9, 15, 11), (0, 0.8, 0, 1.0, 0, 0), strict=True))]
    alone = [engine.generate([p], s, stop_ids=())[0] for p, s in zip(prompts, sampling, strict=True)]
    slots = SlotBatch(engine, stop_ids=(), prefill_rows=4)
    slots.admit(5, prompts[5], sampling[5])  # decoding while the others arrive
    calls = []
    slots._prefill = lambda *args, f=slots._prefill: calls.append(args[6].shape) or f(*args)
    got: dict[int, list[int]] = {i: [] for i in range(6)}
    for slot, (tokens, _) in slots.step().items():
        got[slot].extend(tokens)
    slots.admit_many([0, 1, 2], prompts[:3], sampling[:3])  # 3 prompts and a filler row in one call
    slots.admit_many([3, 4], prompts[3:5], sampling[3:5])
    while slots.active():
        for slot, (tokens, _) in slots.step().items():
            got[slot].extend(tokens)
    assert [got[i] for i in range(6)] == alone
    assert calls == [(4, 32), (4, 32)]  # (rows, prompt bucket) of each prefill call: with filler rows
    with pytest.raises(ValueError, match="distinct free slots"):
        slots.admit_many([1, 1], prompts[:2], sampling[:2])


def test_compile_all_leaves_no_program_to_compile_and_changes_no_reply():
    """The server's warmup runs every prompt bucket and decode window once: requests after it compile nothing
    (a first use would stall every live stream) and get the tokens they get without it."""
    from picochat_jax.generate import SlotBatch, _slot_programs

    fam = Family("rope_gqa")  # context 64
    engine = Engine(fam.params, fam.cfg, max_batch=3, chunk_tokens=3)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 97, n).tolist() for n in (3, 20, 40)]
    sampling = [SamplingParams(max_new_tokens=n) for n in (30, 12, 20)]
    alone = [engine.generate([p], s, stop_ids=())[0] for p, s in zip(prompts, sampling, strict=True)]
    slots = SlotBatch(engine, stop_ids=(), prefill_rows=2)
    assert slots.compile_all(filler=7) == ([16, 32, 64], [16, 32, 64])
    programs = _slot_programs(jax.default_backend() != "cpu")
    compiled = [program._cache_size() for program in programs]
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    slots.admit_many([0, 1], prompts[:2], sampling[:2])  # two rows in one prefill: compiled by the warmup too
    slots.admit(2, prompts[2], sampling[2])
    while slots.active():
        for slot, (tokens, _) in slots.step().items():
            got[slot].extend(tokens)
    assert [got[i] for i in range(3)] == alone
    assert [program._cache_size() for program in programs] == compiled
    slots.admit(0, prompts[0], sampling[0])
    with pytest.raises(RuntimeError, match="every slot free"):
        slots.compile_all(filler=7)


def test_slots_stop_on_a_stop_token_and_free_the_slot():
    from picochat_jax.generate import SlotBatch

    fam = Family("rope_gqa")
    engine = Engine(fam.params, fam.cfg, max_batch=2, chunk_tokens=4)
    prompt = [5, 6, 7, 8]
    reply = engine.generate([prompt], SamplingParams(max_new_tokens=10), stop_ids=())[0]
    stop = reply[3]
    slots = SlotBatch(engine, stop_ids=(stop,))
    slots.admit(0, prompt, SamplingParams(max_new_tokens=10))
    tokens, reasons = [], []
    while slots.active():
        for _, (new, reason) in slots.step().items():
            tokens += new
            reasons.append(reason)
    assert tokens == reply[:reply.index(stop)] and reasons[-1] == "stop" and slots.free_slots() == [0, 1]
    with pytest.raises(ValueError, match="exceeds the context"):
        slots.admit(0, prompt, SamplingParams(max_new_tokens=fam.cfg.max_seq_len))
    assert engine.slots((), size=1).free_slots() == [0] and engine.slots((), size=9).free_slots() == [0, 1]
