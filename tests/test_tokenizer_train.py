"""`picochat tokenizer train`: from a pack or from corpus text, byte or BPE (`hf_bpe` is the same Hugging Face
tokenizer.json), with the vocabulary and minimum frequency asked for, on a bounded seeded sample."""

from __future__ import annotations

from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.tokenizer import ChatTokenizer, SampledTexts


def test_train_from_corpus_text_with_type_vocab_and_min_freq(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"{i:02d}.txt").write_text(f"document {i} about tokenizers and merges and vocabularies\n" * 5)
    bpe = CliRunner().invoke(main, ["tokenizer", "train", "--input", str(docs), "--out", str(tmp_path / "bpe.json"),
                                    "--type", "hf_bpe", "--vocab-size", "300", "--min-freq", "2"])
    assert bpe.exit_code == 0, bpe.output
    tok = ChatTokenizer.load(tmp_path / "bpe.json")
    assert tok.vocab_size == 300 and len(tok.encode("tokenizers and merges")) < len("tokenizers and merges")
    byte = CliRunner().invoke(main, ["tokenizer", "train", "--input", str(docs), "--out", str(tmp_path / "b.json"),
                                     "--type", "byte"])
    assert byte.exit_code == 0 and ChatTokenizer.load(tmp_path / "b.json").vocab_size == 256 + 7
    sampled = CliRunner().invoke(main, ["tokenizer", "train", "--input", str(docs), "--out", str(tmp_path / "s.json"),
                                        "--max-bytes", "1000", "--vocab-size", "280"])
    assert sampled.exit_code == 0 and "of 5,650 corpus bytes" in sampled.output, sampled.output
    assert int(sampled.output.split("trained on ")[1].split(" of")[0].replace(",", "")) < 2000  # the sample


def test_the_sample_is_bounded_seeded_and_representative():
    docs = [(f"doc {i} " * 10, "x") for i in range(1000)]
    total = sum(len(d.encode()) for d, _ in docs)
    first, again = SampledTexts(iter(docs), total, total // 10, seed=0), SampledTexts(iter(docs), total, total // 10)
    assert list(first) == list(again)  # seeded: the same documents every time
    assert 0.07 * total < first.bytes_used < 0.13 * total and 70 < first.documents_used < 130
    everything = SampledTexts(iter(docs), total, total)
    assert len(list(everything)) == 1000
