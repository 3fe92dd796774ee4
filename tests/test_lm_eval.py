"""lm-evaluation-harness itself against `picochat serve`: a multiple-choice task through `local-completions`
(echo + logprobs, tokenized through the server's /tokenizer_info and /tokenize) and a `generate_until` task
through `local-chat-completions`; the harness's numbers must equal our own scorer's on the same model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_serve import CTX, MODEL_ID, native, server  # noqa: F401  (module fixtures reused)

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "the quick brown", "choices": ["fox", "dog", "river"], "answer": 0},
    {"question": "hello there, how are", "choices": ["you", "tokens", "lazy"], "answer": 0},
    {"question": "picochat serves tiny", "choices": ["models", "events", "dog"], "answer": 0},
    {"question": "streaming tokens as", "choices": ["server-sent events", "quick", "hello"], "answer": 0},
    {"question": "jumps over the", "choices": ["lazy dog", "today", "http"], "answer": 1},
]


def _tasks(folder):
    (folder / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"question": q["question"], "answer": q["choices"][0]})
                                              + "\n" for q in QUESTIONS))
    (folder / "pico_mc.yaml").write_text(f"""task: pico_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (folder / "pico_gen.yaml").write_text(f"""task: pico_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|end|>"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")


@pytest.mark.slow
def test_lm_eval_harness_scores_match_our_scorer(server, tmp_path):  # noqa: F811
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    base, backend = server
    _tasks(tmp_path)
    manager = TaskManager(include_path=str(tmp_path))
    common = {"model": MODEL_ID, "max_length": CTX, "num_concurrent": 1, "max_retries": 1}
    mc = simple_evaluate(model="local-completions", tasks=["pico_mc"], task_manager=manager, log_samples=True,
                         model_args={**common, "base_url": f"{base}/v1/completions", "tokenizer_backend": "remote"})
    # Our own scorer on the same requests: context and choice tokenized as the harness does (without special
    # tokens), log-likelihood of the choice from Engine.score.
    fmt, engine = backend.fmt, backend.batcher.engine
    ours_ll, ours_pick = [], []
    for q in QUESTIONS:
        context = fmt.encode_text(q["question"], add_special_tokens=False)
        lls = []
        for choice in q["choices"]:
            whole = fmt.encode_text(q["question"] + " " + choice, add_special_tokens=False)
            scored = engine.score([whole])[0]
            lls.append(sum(scored.logprobs[len(context):]))
        ours_ll.append(lls)
        ours_pick.append(int(np.argmax(lls)))
    samples = sorted(mc["samples"]["pico_mc"], key=lambda s: s["doc_id"])
    harness_ll = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    np.testing.assert_allclose(harness_ll, ours_ll, atol=1e-4)
    ours_acc = float(np.mean([p == q["answer"] for p, q in zip(ours_pick, QUESTIONS, strict=True)]))
    assert mc["results"]["pico_mc"]["acc,none"] == pytest.approx(ours_acc)

    gen = simple_evaluate(model="local-chat-completions", tasks=["pico_gen"], task_manager=manager,
                          log_samples=True, apply_chat_template=True,
                          model_args={**common, "base_url": f"{base}/v1/chat/completions",
                                      "tokenizer_backend": None})
    from picochat_jax.data.records import Message
    from picochat_jax.generate import SamplingParams

    for sample in gen["samples"]["pico_gen"]:
        prompt = fmt.encode_prompt([Message("user", sample["doc"]["question"])])
        reply = engine.generate([prompt], SamplingParams(max_new_tokens=8), fmt.stop_ids)
        assert sample["resps"][0][0] == fmt.decode(reply[0])
    assert "exact_match,none" in gen["results"]["pico_gen"]
