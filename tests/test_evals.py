"""The long-context eval harness: exact prompt lengths and depths, scoring against scripted
models whose scores are known (an oracle 100 %, a wrong one 0 %, uniform logits log V), the
CausalLM adapter, the output files, the CLI and the experiment files."""

from __future__ import annotations

import collections
import glob
import json
import math
import re

import numpy as np
import pytest
import yaml

from qwenjax.data.passkey import PASSKEY_NEEDLE, estimate_tokens, passkey_corpus
from qwenjax.data.tokenizer import train_bpe
from qwenjax.evals import haystack, runner
from qwenjax.evals.filler import SentenceSource, essay_sentences
from qwenjax.evals.perplexity import bucket_nll
from qwenjax.evals.tasks import TaskContext, sample_rng, score
from qwenjax.experiment import EvalConfig, load_experiment


@pytest.fixture(scope="module")
def tok():
    # Small and quick to train; byte-level, so it encodes any text the tasks produce.
    texts = list(essay_sentences()[:400]) + [PASSKEY_NEEDLE.format(key=k) for k in range(100)]
    return train_bpe(texts, 400)


def solve(text: str) -> str:
    """What a perfect reader answers: found by reading the prompt, as the tasks phrase it."""
    if text.endswith("The pass key is"):
        return re.search(r"The pass key is (\d+)\. Remember it", text).group(1)
    if m := re.search(r"special magic number for (\S+) mentioned in the provided text is$", text):
        return re.search(rf"magic numbers for {re.escape(m.group(1))} is: (\d+)", text).group(1)
    if m := re.search(r"assigned the value (\d+) in the text above", text):
        assign = dict(re.findall(r"VAR (\w+) = (\d+|VAR \w+)\.", text))
        held = {}
        for name, rhs in assign.items():  # statements of a chain come in order
            held[name] = held[rhs[4:]] if rhs.startswith("VAR ") else rhs
        return ", ".join(n for n, v in held.items() if v == m.group(1))
    if "most common words" in text:
        words = re.findall(r"\d+\. (\w+)", text.split("Question:")[0])
        return ", ".join(w for w, _ in collections.Counter(words).most_common(10))
    raise AssertionError(f"unknown task prompt: {text[-80:]!r}")


class Oracle:
    """Reads the answer from the prompt tokens; `wrong` answers something else of the same form."""

    def __init__(self, tok, wrong: bool = False):
        self.tok, self.wrong = tok, wrong

    def generate(self, prompts, max_new_tokens):
        out = []
        for p in prompts:
            answer = solve(self.tok.decode(p))
            if self.wrong:
                answer = re.sub(r"\d", "0", answer)  # no key has a leading 0
                answer = re.sub(r"[A-Za-z]+", lambda w: "zz" + w.group(0), answer)
            out.append(self.tok.encode(f" {answer}."))
        return out

    def logprobs(self, sequences):
        raise NotImplementedError


class Uniform:
    """Equal logits over V tokens: every log-probability is -log V."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def logprobs(self, sequences):
        return [np.full(len(s) - 1, -math.log(self.vocab)) for s in sequences]


GEN_TASKS = ["passkey", "niah_single", "niah_multikey", "variable_tracking", "common_words"]


@pytest.mark.parametrize("wrong", [False, True])
def test_oracle_scores_all_and_wrong_scores_none(tok, tmp_path, wrong):
    cfg = EvalConfig(
        tasks=GEN_TASKS,
        lengths=[600, 1200],
        depths=[0.0, 0.5, 1.0],
        samples=2,
        batch_size=3,
        filler="essay",
    )
    res = runner.run(Oracle(tok, wrong), tok, cfg, tmp_path / "out", log=lambda m: None)
    want = 0.0 if wrong else 1.0
    for task in GEN_TASKS:
        assert res["tasks"][task]["by_length"] == [want, want], task
        if res["tasks"][task]["depths"] is not None:
            assert res["tasks"][task]["grid"] == [[want, want]] * 3
    assert len(res["samples"]) == 2 * (3 * 3 + 2) * 2
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "results.json",
        "results.md",
        "summary.png",
        "heatmap_passkey.png",
        "heatmap_niah_multikey.png",
    } <= files
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tasks"].keys() == set(
        GEN_TASKS
    )
    assert (tmp_path / "out" / "heatmap_passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert "| passkey |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("kind", ["essay", "repeat"])
def test_haystack_length_exact_and_needle_at_depth(tok, kind):
    source = SentenceSource(tok, kind)
    prefix, question = tok.encode("Find the needle."), tok.encode(" What is the needle?")
    for length in (200, 1000, 4000):
        for depth in (0.0, 0.1, 0.33, 0.5, 0.9, 1.0):
            needle = tok.encode(" The needle is 4242.")
            rng = sample_rng(0, kind, length, int(depth * 100), 0)
            hay = haystack.build(
                length, prefix, question, [haystack.Needle(needle, depth)], source, rng
            )
            assert len(hay.tokens) == length
            start = hay.needle_starts[0]
            assert hay.tokens[start : start + len(needle)] == needle
            assert hay.tokens[: len(prefix)] == prefix and hay.tokens[-len(question) :] == question
            measured = (start - len(prefix)) / hay.budget  # filler tokens before the needle
            assert measured == pytest.approx(hay.depths[0])
            assert abs(measured - depth) <= source.max_tokens / hay.budget


def test_multi_needle_order_and_ruler_lengths(tok):
    ctx = TaskContext(tok, SentenceSource(tok, "essay"), num_keys=5)
    from qwenjax.evals import needle, ruler

    for length in (800, 2500):
        rng = sample_rng(1, "t", length, 0, 0)
        s = needle.niah_multikey(ctx, length, 0.25, rng)
        assert len(s.prompt) == length and s.meta["distractors"] == 4
        assert abs(s.meta["realised_depth"] - 0.25) <= ctx.sentences.max_tokens / (length / 2)
        vt = ruler.variable_tracking(ctx, length, None, rng)
        assert len(vt.prompt) == length and vt.meta["depths"] == sorted(vt.meta["depths"])
        cwe = ruler.common_words(ctx, length, None, rng)
        assert len(cwe.prompt) == length and len(cwe.answers) == 10
        text = tok.decode(cwe.prompt)
        counts = collections.Counter(re.findall(r"\d+\. (\w+)", text))
        assert min(counts[w] for w in cwe.answers) > max(
            c for w, c in counts.items() if w not in cwe.answers
        )


def test_prompts_are_deterministic_from_the_seed(tok):
    ctx = TaskContext(tok, SentenceSource(tok, "essay"))
    cfg = EvalConfig(lengths=[700], depths=[0.5], samples=2, seed=5)
    for task in ("niah_multikey", "variable_tracking", "common_words"):
        a, b = runner.build_samples(task, ctx, cfg), runner.build_samples(task, ctx, cfg)
        assert [x.prompt for x in a] == [x.prompt for x in b]
        assert a[0].prompt != a[1].prompt
        other = runner.build_samples(task, ctx, EvalConfig(lengths=[700], depths=[0.5], seed=6))
        assert other[0].prompt != a[0].prompt


def test_too_short_length_is_a_clear_error(tok):
    from qwenjax.errors import ConfigError

    with pytest.raises(ConfigError, match="too short for passkey"):
        runner.build_samples(
            "passkey", TaskContext(tok, SentenceSource(tok, "repeat")), EvalConfig(lengths=[20])
        )


def test_score_is_whole_word_fraction():
    assert score(" 12345.", ["12345"]) == 1.0
    assert score(" 123456.", ["12345"]) == 0.0
    assert score("ABCDE, fghij and more", ["abcde", "FGHIJ", "KLMNO", "x"]) == 0.5


def test_perplexity_buckets(tok, tmp_path):
    # Uniform logits: nll = log V in every bucket, ppl = V.
    cfg = EvalConfig(
        tasks=["perplexity"],
        lengths=[128, 1000],
        samples=3,
        ppl_buckets=4,
        batch_size=2,
        filler="essay",
    )
    res = runner.run(Uniform(tok.vocab_size), tok, cfg, tmp_path / "ppl", log=lambda m: None)
    for length in ("128", "1000"):
        rows = res["perplexity"][length]
        assert [r["start"] for r in rows] == [
            0,
            int(length) // 4,
            int(length) // 2,
            3 * int(length) // 4,
        ]
        for r in rows:
            assert r["nll"] == pytest.approx(math.log(tok.vocab_size))
            assert r["ppl"] == pytest.approx(tok.vocab_size)
        assert sum(r["tokens"] for r in rows) == 3 * (int(length) - 1)
    assert (tmp_path / "ppl" / "perplexity.png").exists()
    # A known ramp: log p of position p is -p, so bucket [lo, hi) averages lo..hi-1 (from 1).
    rows = bucket_nll([-np.arange(1, 10.0)], 10, 2)
    assert [r["nll"] for r in rows] == [pytest.approx(2.5), pytest.approx(7.0)]


def test_qwenjax_adapter_logprobs_match_full_logits():
    import jax
    import jax.numpy as jnp

    from qwenjax.config import load_preset
    from qwenjax.evals.model_api import QwenJaxModel
    from qwenjax.model.transformer import init_model

    model = init_model(load_preset("qwen3-tiny").replace(num_layers=1), seed=0)
    seqs = [list(range(3, 24)), list(range(40, 53))]  # T = 21 and 13; chunk 8 -> 3 chunks
    got = QwenJaxModel(model, chunk=8).logprobs(seqs)
    ids = np.zeros((2, 21), np.int32)  # right padding cannot change causal logits
    ids[0], ids[1, :13] = seqs[0], seqs[1]
    lp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids)), axis=-1))
    for b, (s, g) in enumerate(zip(seqs, got)):
        assert g.shape == (len(s) - 1,)
        np.testing.assert_allclose(g, lp[b, np.arange(len(s) - 1), s[1:]], atol=2e-5)


def test_qwenjax_adapter_on_a_context_mesh_matches_one_device(monkeypatch):
    """An eval experiment with `context` > 1: scoring runs sequence-parallel (tokens in the
    zigzag layout and back) and generation prefills over the ring; both equal one device."""
    import jax
    from flax import nnx

    from qwenjax.config import load_preset
    from qwenjax.evals.model_api import QwenJaxModel
    from qwenjax.model import sequence_ops
    from qwenjax.model.partition import state_shardings
    from qwenjax.model.transformer import init_model
    from qwenjax.sharding import make_mesh

    model = init_model(load_preset("qwen3.5-moe-tiny").replace(num_layers=4), seed=0)
    mesh = make_mesh({"context": 4}, jax.devices()[:4])
    graphdef, params = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(params, state_shardings(params, mesh)))
    seqs = [list(range(3, 24)), list(range(40, 53))]
    one, ctx = QwenJaxModel(model, chunk=8), QwenJaxModel(sharded, chunk=8, mesh=mesh)
    want_lp, want_gen = one.logprobs(seqs), one.generate(seqs, 6)
    rings = []
    ring = sequence_ops.ring_attention
    monkeypatch.setattr(sequence_ops, "ring_attention", lambda *a, **k: rings.append(1) or ring(*a, **k))
    for a, b in zip(want_lp, ctx.logprobs(seqs)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=2e-5)
    scored = len(rings)
    assert ctx.generate(seqs, 6) == want_gen
    assert scored >= 1 and len(rings) > scored  # both calls ran under the mesh, over the ring


def test_context_override_keeps_weights_and_merges_rope():
    from qwenjax.config import load_preset
    from qwenjax.evals.loading import with_context_settings
    from qwenjax.model.transformer import init_model

    model = init_model(load_preset("qwen3-tiny").replace(num_layers=1), seed=0)
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    out = with_context_settings(
        model, {"rope": rope, "max_position_embeddings": 16384, "num_layers": 9}
    )  # shape keys are ignored
    assert out.config.rope.rope_type == "yarn" and out.config.rope.factor == 4.0
    assert out.config.rope.rope_theta == model.config.rope.rope_theta
    assert out.config.num_layers == 1 and out.config.max_position_embeddings == 16384
    np.testing.assert_array_equal(out.embed[...], model.embed[...])


def test_passkey_corpus_documents():
    docs = passkey_corpus(50, 256, seed=3)
    assert docs[7] == passkey_corpus(50, 256, seed=3)[7]
    for i in range(50):
        d = docs[i]
        key = re.search(r"The pass key is (\d{5})\. Remember it", d).group(1)
        assert d.endswith(f"What is the pass key? The pass key is {key}.")
        assert 256 // 4 - 10 <= estimate_tokens(d) <= 256


def test_eval_experiment_files_parse():
    files = glob.glob("experiments/eval-*.yaml") + glob.glob("experiments/passkey-*.yaml")
    assert len(files) >= 4
    for f in files:
        exp = load_experiment(f)
        assert exp.eval.tasks, f
    q35 = load_experiment("experiments/eval-qwen3.5-1m.yaml")
    assert max(q35.eval.lengths) == 1 << 20 and min(q35.eval.lengths) == 32 * 1024
    rope = q35.model_config().rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == (
        "yarn",
        4.0,
        262144,
    )


def test_cli_eval_end_to_end(tok, tmp_path):
    from qwenjax.cli import main
    from qwenjax.config import load_preset
    from qwenjax.hf.convert import save_pretrained
    from qwenjax.model.transformer import init_model

    hf = tmp_path / "hf"
    save_pretrained(init_model(load_preset("qwen3-tiny").replace(num_layers=1)), hf)
    tok.save(hf)
    exp = tmp_path / "e.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "model": "qwen3-tiny",
                "eval": {
                    "model": str(hf),
                    "tasks": ["passkey", "perplexity"],
                    "lengths": [160],
                    "depths": [0.5],
                    "samples": 2,
                    "batch_size": 2,
                    "filler": "repeat",
                    "ppl_buckets": 2,
                },
            }
        )
    )
    assert main(["eval", str(exp), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(res["samples"]) == 2 and len(res["perplexity"]["160"]) == 2
    assert main(["eval", str(exp), "--set", f"eval.model={tmp_path / 'nothing'}"]) == 2
