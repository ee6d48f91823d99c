"""Logits parity with `transformers` for every family: fp32 exact-ish, bf16 close in distribution."""

import copy

import hf_models
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwenjax


def _kl(ref_logits, logits):
    """Mean KL(ref || ours) over positions, from logits [N,V]."""
    ref = ref_logits - ref_logits.max(-1, keepdims=True)
    ours = logits - logits.max(-1, keepdims=True)
    lp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    lq = ours - np.log(np.exp(ours).sum(-1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("family,name,over", hf_models.all_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_fp32_logits_match_transformers(tmp_path, family, name, over):
    hf = hf_models.build(family, over)
    model = qwenjax.from_pretrained(hf_models.save(hf, tmp_path / "hf"))
    # Lengths that are not powers of two nor multiples of the delta-rule chunk (64); the second
    # batch is padded on the left.
    for T, pad in ((37, 0), (70, 9), (130, 0)):
        ids, mask = hf_models.batch(hf.config.vocab_size, 2, T, seed=T, left_pad=pad)
        ref = hf_models.hf_logits(hf, ids, mask if pad else None)
        out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        real = mask.astype(bool)
        assert np.abs(out[real] - ref[real]).max() <= 1e-4, (family, name, T)


@pytest.mark.parametrize("family", sorted(hf_models.CASES))
def test_bf16_logits_close_to_transformers_fp32(tmp_path, family):
    # Briefly trained so predictions are confident (random models have near-tied logits), and
    # for MoE top-4 of 16 experts: with top-2 of 6, one bf16 routing flip swaps half a token's
    # MoE output, which moves mean KL past 1e-3 for transformers' own bf16 run too.
    _name, over = hf_models.CASES[family][0]
    if "num_experts" in over:
        over = dict(over, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16)
    hf = hf_models.train_briefly(hf_models.build(family, over))
    model = qwenjax.from_pretrained(
        hf_models.save(hf, tmp_path / "hf"), runtime=qwenjax.RuntimeConfig(dtype="bfloat16")
    )
    V = hf.config.vocab_size
    ids, mask = hf_models.batch(V, 8, 70, seed=1, left_pad=5)
    ids[:, 35:] = (ids[:, 35:36] + 2 * np.arange(35)) % V  # second half follows the learned rule
    real = mask.astype(bool)
    ref = hf_models.hf_logits(hf, ids, mask)[real]
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))[real]
    top1 = float((out.argmax(-1) == ref.argmax(-1)).mean())
    assert top1 >= 0.99, (family, top1)
    if "linear_num_key_heads" not in over:
        assert _kl(ref, out) <= 1e-3, family
    else:
        # Hybrid MoE models in bf16 drift further (transformers' own bf16 run of these weights:
        # mean KL 1.5e-3 / 2.1e-3); their contract is top-1 >= 99 %, plus: no worse than 2x
        # transformers in the same precision.
        hf_bf16 = hf_models.hf_logits(copy.deepcopy(hf).to(torch.bfloat16), ids, mask)[real]
        assert _kl(ref, out) <= 2 * _kl(ref, hf_bf16) + 1e-4, family
