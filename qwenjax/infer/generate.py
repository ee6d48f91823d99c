"""Batched sampling from a causal LM: greedy or temperature / top-k, stop tokens.

This version keeps no KV cache: the whole [B, P+N] buffer is re-run through the model for every
new token inside one jitted `fori_loop` (static shapes, compiled once per (B, P+N)). Causal
masking makes a row's logits at its last real token independent of the unwritten tail, so the
result is exact for prompts of different lengths; cost is O(N * (P+N)^2), fine for short samples
and tests. (A KV / recurrent-state cache is the job of the inference issue.)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.model.transformer import CausalLM


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
) -> list[list[int]]:
    """prompts (lists of token ids) -> new tokens per prompt (up to a stop token, excluded)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    total = int(lengths.max()) + max_new_tokens
    buf = np.zeros((B, total), np.int32)
    for b, p in enumerate(prompts):
        buf[b, : len(p)] = p
    graphdef, params = nnx.split(model)
    out = _sample(graphdef, params, jnp.asarray(buf), jnp.asarray(lengths), max_new_tokens,
                  float(temperature), int(top_k), jax.random.key(seed))
    out = np.asarray(out)
    results = []
    stops = set(int(t) for t in stop_tokens)
    for b in range(B):
        new = out[b, lengths[b]: lengths[b] + max_new_tokens].tolist()
        for i, t in enumerate(new):
            if t in stops:
                new = new[:i]
                break
        results.append(new)
    return results


@jax.jit(static_argnums=(0, 4, 5, 6))
def _sample(graphdef, params, buf, lengths, steps, temperature, top_k, key):
    model = nnx.merge(graphdef, params)
    rows = jnp.arange(buf.shape[0])

    def body(i, carry):
        buf, key = carry
        logits = model(buf)[rows, lengths + i - 1]  # [B, V] at each row's last token
        key, sub = jax.random.split(key)
        if temperature == 0.0:
            token = jnp.argmax(logits, axis=-1)
        else:
            logits = logits / temperature
            if top_k:
                kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            token = jax.random.categorical(sub, logits, axis=-1)
        return buf.at[rows, lengths + i].set(token.astype(buf.dtype)), key

    buf, _ = jax.lax.fori_loop(0, steps, body, (buf, key))
    return buf
