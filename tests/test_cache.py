"""Cached inference equals the full forward: prefill (in chunks) + decoding steps give, at every
position, the logits of one pass over the whole (left-padded) sequence, for attention layers
(Qwen3-MoE) and Gated DeltaNet hybrids (Qwen3.5-MoE; Qwen3-Next has the same layers), with rows
of different lengths.
"""

import functools

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.infer import cache as kv
from qwenjax.model.partition import init_sharded

CONFIGS = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(hf_models.MOE, head_dim=16)),
    # Alternating layer kinds: one Gated DeltaNet and one attention layer per scanned block,
    # which keeps the compile short (the default 3:1 pattern traces three DeltaNet layers).
    "qwen3_5_moe_text": (
        transformers.Qwen3_5MoeTextConfig,
        dict(hf_models.HYBRID, **hf_models.HYBRID_MOE, layer_types=hf_models.MIXED),
    ),
}


@functools.cache
def tiny_model(family: str):
    config_cls, over = CONFIGS[family]
    hf = config_cls(**{**hf_models.BASE, **over}).to_dict()
    cfg = ModelConfig.from_hf_config(hf).with_runtime(attn_block=8)  # several key blocks per chunk
    return nnx.merge(*init_sharded(cfg, None, seed=1))  # a jitted init: faster than eager


def reference_logits(model, ids, positions, segment_ids):
    return np.asarray(
        model(
            jnp.asarray(ids),
            positions=jnp.asarray(positions),
            attention_mask=jnp.asarray(segment_ids),
        )
    )


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_chunks_and_steps_match_full_forward(family):
    model = tiny_model(family)
    V = model.config.vocab_size
    rng = np.random.RandomState(0)
    lengths = [29, 17, 23]  # total tokens per row (prompt + decoded), left-padded to 29
    T = max(lengths)
    ids, positions, segs = kv.left_pad([list(rng.randint(0, V, n)) for n in lengths], T)
    ref = reference_logits(model, ids, positions, segs)

    step = jax.jit(kv.extend)
    cache = kv.init_cache(model.config, len(lengths), T + 3)  # spare slots stay empty
    outs = []
    # Prefill 20 slots in chunks of 7, 7, 6 (the chunk does not divide the prompt), then decode
    # the last 9 one token at a time.
    for lo, hi in [(0, 7), (7, 14), (14, 20), *((t, t + 1) for t in range(20, T))]:
        logits, cache = step(model, cache, ids[:, lo:hi], positions[:, lo:hi], segs[:, lo:hi])
        outs.append(np.asarray(logits))
    out = np.concatenate(outs, axis=1)
    real = segs.astype(bool)
    assert np.abs(out[real] - ref[real]).max() <= 1e-4
    assert int(cache.length) == T


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_scanned_prefill_and_decode_step(family):
    model = tiny_model(family)
    V = model.config.vocab_size
    rng = np.random.RandomState(1)
    prompts = [list(rng.randint(0, V, n)) for n in (13, 5)]
    P, C = 16, 8  # prompts left-padded to a multiple of the chunk
    ids, positions, segs = kv.left_pad(prompts, P)
    nxt = rng.randint(0, V, 2).astype(np.int32)  # one more token per row
    ref_ids, ref_pos, ref_segs = kv.left_pad([p + [int(t)] for p, t in zip(prompts, nxt)], P + 1)
    ref = reference_logits(model, ref_ids, ref_pos, ref_segs)

    cache = kv.init_cache(model.config, 2, P + 4)
    prefill = jax.jit(kv.prefill, static_argnames="chunk")
    logits, cache = prefill(model, cache, ids, positions, segs, chunk=C)
    assert np.abs(np.asarray(logits) - ref[:, P - 1]).max() <= 1e-4
    new_pos = jnp.asarray([len(p) for p in prompts], jnp.int32)
    logits, cache = jax.jit(kv.decode_step)(model, cache, jnp.asarray(nxt), new_pos)
    assert np.abs(np.asarray(logits) - ref[:, P]).max() <= 1e-4
