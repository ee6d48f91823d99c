"""The inference cache and the passes over it: prefill (chunked on one device, sequence-parallel
with `context` > 1) and one decoding step.

A `Cache` (model/transformer.py) has S slots per row. Full-attention layers keep keys and values
[R,B,S,K,Dh]; Gated DeltaNet layers keep their conv windows [R,B,K-1,...] and delta-rule state
[R,B,Hv,Dk,Dv] (fp32), stacked on each layer stack's repeat axis R so the layer scan carries
them. Slot s of row b holds the token at `positions[b,s]` (`segment_ids[b,s]`: -1 empty,
0 padding, 1 a token), which is all attention needs for its masks.

Prompts of different lengths are left-padded to a common length P, so every row writes its n-th
token at the same slot: one scalar write index, static shapes, and the last prompt token of every
row in slot P-1 (after a sequence-parallel prefill, the prompt's slots are in the context layout's
order instead; masks only read each slot's position, so nothing else changes). Positions count
real tokens only (0 at each row's first token), which is what `transformers` does with left
padding and an attention mask.

Dimension letters: B batch, T new tokens, P padded prompt length, C prefill chunk, S slots,
D model, V vocab, R repeats of a stack's block.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.config import ModelConfig
from qwenjax.model.attention import KVCache
from qwenjax.model.gated_deltanet import RecurrentState
from qwenjax.model.sequence_ops import global_tail, to_context_layout
from qwenjax.model.transformer import Cache, CausalLM, stack_plan
from qwenjax.ops.context_layout import check_divisible, layout_unit
from qwenjax.sharding import constrain, context_parallel

F32 = jnp.float32
KV_AXES = ("layers", "batch", "length", "act_kv_heads", None)  # [R,B,S,K,Dh]


def init_cache(cfg: ModelConfig, batch: int, slots: int) -> Cache:
    """An empty cache of `slots` slots per row; keys, values and conv windows in the compute
    dtype, delta-rule states in fp32."""
    dtype = jnp.dtype(cfg.runtime.dtype)
    K, Dh = cfg.num_kv_heads, cfg.head_dim
    Hk, Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    Dk, Dv, W = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim - 1

    def layer(kind: str, R: int):
        if kind == "linear_attention":
            return RecurrentState(
                jnp.zeros((R, batch, W, Hk, Dk), dtype),
                jnp.zeros((R, batch, W, Hk, Dk), dtype),
                jnp.zeros((R, batch, W, Hv, Dv), dtype),
                jnp.zeros((R, batch, Hv, Dk, Dv), F32),
            )
        # With `context` > 1 in the current mesh the slots are split over it (sequence-sharded
        # cache: each device holds S / context slots; attention merges shards by log-sum-exp).
        kv = lambda: constrain(jnp.zeros((R, batch, slots, K, Dh), dtype), KV_AXES)
        return KVCache(kv(), kv())

    layers = tuple(
        tuple(layer(attn, spec.repeats) for attn, _ in spec.pattern)
        for spec in stack_plan(cfg.layer_kinds)
    )
    return Cache(
        layers,
        constrain(jnp.zeros((batch, slots), jnp.int32), ("batch", "length")),
        constrain(jnp.full((batch, slots), -1, jnp.int32), ("batch", "length")),
        jnp.zeros((), jnp.int32),
    )


def cache_bytes(cache: Cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """Prompts -> (ids, positions, segment_ids) [B,length] int32 numpy, left-padded; positions
    count each row's real tokens from 0 (padding gets 0), segment ids are 1 for tokens, 0 else."""
    B = len(prompts)
    ids = np.full((B, length), pad_id, np.int32)
    positions = np.zeros((B, length), np.int32)
    segment_ids = np.zeros((B, length), np.int32)
    for b, p in enumerate(prompts):
        n = len(p)
        if n > length:
            raise ValueError(f"prompt {b} has {n} tokens, more than the {length} slots given")
        if n:
            ids[b, length - n :] = p
            positions[b, length - n :] = np.arange(n)
            segment_ids[b, length - n :] = 1
    return ids, positions, segment_ids


def logits_of(model: CausalLM, h):
    """Final hidden states [..., D] -> fp32 logits [..., V]."""
    return (h @ model.head_kernel().astype(h.dtype)).astype(F32)


def extend(model: CausalLM, cache: Cache, input_ids, positions, segment_ids):
    """Run [B,T] new tokens through the cache -> (fp32 logits [B,T,V], new cache). Any T."""
    h, cache = model.extend(input_ids, cache, positions=positions, segment_ids=segment_ids)
    return logits_of(model, h), cache


def prefill(model: CausalLM, cache: Cache, input_ids, positions, segment_ids, *, chunk: int):
    """Write a left-padded prompt [B,P] into an empty cache -> (fp32 logits [B,V] of each row's
    last prompt token, cache). Traceable.

    On one device (or a mesh without `context`), `chunk` tokens at a time (P % chunk == 0): each
    chunk attends to the cache and itself, so memory is O(chunk * S), not O(P^2), and the chunks
    run in a `lax.scan`, so a long prompt compiles one chunk. With `context` > 1 the prompt is
    split over the context devices instead (`prefill_sequence_parallel`; `chunk` is unused).
    """
    if context_parallel() is not None:
        return prefill_sequence_parallel(model, cache, input_ids, positions, segment_ids)
    B, P = input_ids.shape
    if P % chunk:
        raise ValueError(f"prompt length {P} is not a multiple of the prefill chunk {chunk}")
    # [n,B,C] chunks, scanned; only the last token's hidden state is kept (no [B,C,V] logits).
    split = lambda x: jnp.moveaxis(x.reshape(B, P // chunk, chunk), 1, 0)
    D = model.config.hidden_size

    def step(carry, xs):
        cache, _ = carry
        h, cache = model.extend(xs[0], cache, positions=xs[1], segment_ids=xs[2])
        return (cache, h[:, -1]), None

    last = jnp.zeros((B, D), jnp.dtype(model.config.runtime.dtype))
    xs = (split(input_ids), split(positions), split(segment_ids))
    (cache, h), _ = jax.lax.scan(step, (cache, last), xs)
    return logits_of(model, h), cache


def prefill_sequence_parallel(model: CausalLM, cache: Cache, input_ids, positions, segment_ids):
    """`prefill` with the prompt split over the `context` devices, as a training step splits a
    sequence: the tokens go into the context layout, and one pass of the layers' full-sequence
    forms — ring attention, the parallel delta-rule scan with conv halos — runs with O(P / n)
    activations per device and fills the cache, whose slots stay split over `context` (slots
    [0, P) hold the prompt in layout order). P must divide into the layout (a multiple of 2n for
    zigzag), and the cache's slot count a multiple of n. The cache must be empty."""
    mesh, layout = context_parallel()
    n = mesh.shape["context"]
    P, S = input_ids.shape[1], cache.positions.shape[1]
    check_divisible(P, n, layout)
    if S % n:
        raise ValueError(f"the cache's {S} slots do not split over context={n} devices")
    lay = lambda x: to_context_layout(jnp.asarray(x))
    h, cache = model.extend(lay(input_ids), cache, positions=lay(positions),
                            segment_ids=lay(segment_ids), fresh=True)
    return logits_of(model, global_tail(h, 1)[:, 0]), cache  # each row's last prompt token


def context_multiple() -> int:
    """What prompt lengths must be a multiple of for `prefill` under the current mesh (1 without
    a `context` axis; 2n for the zigzag layout over n context devices)."""
    ctx = context_parallel()
    return 1 if ctx is None else layout_unit(ctx[0].shape["context"], ctx[1])


def decode_step(model: CausalLM, cache: Cache, tokens, positions):
    """One new token per row, tokens/positions [B] -> (fp32 logits [B,V], cache)."""
    ones = jnp.ones_like(tokens)[:, None]
    h, cache = model.extend(tokens[:, None], cache, positions=positions[:, None], segment_ids=ones)
    return logits_of(model, h[:, 0]), cache
