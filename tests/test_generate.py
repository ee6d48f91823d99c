"""Generation: greedy decoding equals `transformers.generate` token for token (left-padded batch
of different prompt lengths, Qwen3-MoE and Qwen3.5-MoE), and the sampling settings behave."""

import functools
import tempfile

import hf_models
import jax
import numpy as np
import pytest
import torch

import qwenjax
from qwenjax.infer.generate import generate, generate_stream
from qwenjax.infer.sampling import Sampling, filter_logits

NEW = 40
LENGTHS = (11, 26, 4)  # prompt lengths; with prefill_chunk=8 the longest takes 4 chunks

FAMILIES = {
    "qwen3_moe": dict(hf_models.MOE, head_dim=16, norm_topk_prob=True),
    "qwen3_5_moe_text": dict(hf_models.HYBRID, **hf_models.HYBRID_MOE),
}


def hf_greedy(hf, prompts, new):
    """transformers' greedy generate on the left-padded batch -> new tokens per prompt."""
    P = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), P), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p)
        mask[b, P - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[:, P:].tolist()


@functools.cache
def _built(family):
    """(transformers model, the same weights in qwenjax), built once per test session."""
    hf = hf_models.build(family, FAMILIES[family], seed=0)
    hf = hf_models.train_briefly(hf, steps=40)  # confident predictions: no near-tied logits
    with tempfile.TemporaryDirectory() as tmp:
        return hf, qwenjax.from_pretrained(hf_models.save(hf, f"{tmp}/hf"))


def prompts_for(vocab, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, vocab, n).tolist() for n in LENGTHS]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers(family):
    hf, model = _built(family)
    prompts = prompts_for(hf.config.vocab_size)
    ours = generate(model, prompts, max_new_tokens=NEW, prefill_chunk=8)
    assert ours == hf_greedy(hf, prompts, NEW)


def test_sampling_settings():
    # The sampling logic does not depend on the layers: checked on the attention-only model.
    hf, model = _built("qwen3_moe")
    prompts = prompts_for(hf.config.vocab_size, seed=1)
    greedy = generate(model, prompts, max_new_tokens=12)
    sampled = {"max_new_tokens": 12, "temperature": 1.5, "seed": 7}
    a = generate(model, prompts, **sampled)
    assert a == generate(model, prompts, **sampled)  # same seed, same tokens
    assert a != generate(model, prompts, **{**sampled, "seed": 8})
    assert generate(model, prompts, **sampled, top_k=1) == greedy
    # Streaming yields what the batched loop returns, one row at a time.
    assert (
        list(generate_stream(model, prompts[0], **sampled, top_p=0.9))
        == generate(model, prompts[:1], **sampled, top_p=0.9)[0]
    )
    # Stop tokens end each row on its own: stop at each row's 5th greedy token.
    stops = [[row[4]] for row in greedy]
    cut = generate(model, prompts, max_new_tokens=12, stop_tokens=stops)
    assert cut == [row[: row.index(s[0])] for row, s in zip(greedy, stops)]
    assert generate(model, prompts, max_new_tokens=12, stop_tokens=[greedy[0][0]])[0] == []


def test_top_p_keeps_the_nucleus():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two (0.5 < 0.75 <= 0.8).
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jax.numpy.asarray(np.log(probs))
    # top_k 3 then top_p 0.75 of the renormalised three: still the first two.
    assert np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, 3, 0.75)))).sum() == 2
    assert np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, 3, 1.0)))).sum() == 3
    kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, 0, 0.75))))
    assert kept.tolist() == [[True, True, False, False]]
    # Sampled frequencies: never a removed token, and the kept two renormalised (0.625, 0.375)
    # within 4 standard deviations over 4000 draws.
    keys = jax.random.split(jax.random.key(0), 4000)
    nucleus = filter_logits(logits, Sampling(1.0, 0, 0.75))
    draws = jax.vmap(lambda k: jax.random.categorical(k, nucleus))(keys)
    counts = np.bincount(np.asarray(draws).ravel(), minlength=4)
    assert counts[2:].sum() == 0
    sd = np.sqrt(4000 * 0.625 * 0.375)
    assert abs(counts[0] - 2500) <= 4 * sd
