"""Grouped-query self-attention: q/k/v projections (optional bias), per-head q/k RMSNorm,
RoPE (possibly partial), blockwise attention, optional per-head sigmoid output gate (Qwen3-Next,
Qwen3.5), output projection.

Dimension letters: B batch, T length, D model, H query heads, K kv heads, Dh head dim,
S cache slots.

`__call__` is the training / full-sequence path. `extend` is the inference path: it writes the
new tokens' keys and values into a KV cache at a slot index and attends over the whole cache,
masked by the slots' positions and segment ids (empty slots carry a segment id no token has).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwenjax.config import ModelConfig
from qwenjax.model.layers import apply_rope, make_param, rms_norm
from qwenjax.model.lora import dropout_branch
from qwenjax.model.sequence_ops import cached_attention, causal_attention


class KVCache(NamedTuple):
    """One attention layer's cache: keys and values of S slots, [B,S,K,Dh], compute dtype."""

    k: jax.Array
    v: jax.Array


class CacheSlots(NamedTuple):
    """What every cache slot holds once the current tokens are written (shared by all layers)."""

    index: jax.Array  # int32 scalar: the slot of the first current token
    positions: jax.Array  # [B,S] int32: each slot's token position
    segment_ids: jax.Array  # [B,S] int32: each slot's segment id (-1: empty, 0: padding)
    # The cache held nothing before the current tokens (a whole-prompt prefill), so they attend
    # only to each other — by ring attention when split over `context`. A Python bool: the
    # layer scan closes over `CacheSlots`, it is never a traced argument.
    fresh: bool = False


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K, Dh, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.runtime.param_dtype
        self.cfg = cfg
        self.q_kernel = make_param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), pd)
        self.k_kernel = make_param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd)
        self.v_kernel = make_param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd)
        self.o_kernel = make_param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = make_param(rngs, (H, Dh), ("heads", "head_dim"), pd, "zeros")
            self.k_bias = make_param(rngs, (K, Dh), ("kv_heads", "head_dim"), pd, "zeros")
            self.v_bias = make_param(rngs, (K, Dh), ("kv_heads", "head_dim"), pd, "zeros")
        if cfg.o_bias:
            self.o_bias = make_param(rngs, (D,), ("norm",), pd, "zeros")
        if cfg.qk_norm:
            norm_init = "zeros" if cfg.norm_zero_centered else "ones"
            self.q_norm = make_param(rngs, (Dh,), ("norm",), pd, norm_init)
            self.k_norm = make_param(rngs, (Dh,), ("norm",), pd, norm_init)
        if cfg.attention_output_gate:
            self.gate_kernel = make_param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), pd)
            if cfg.qkv_bias:
                self.gate_bias = make_param(rngs, (H, Dh), ("heads", "head_dim"), pd, "zeros")

    def _project(self, x, name):
        """x [B,T,D] -> [B,T,heads,Dh] through `name`_kernel (and its bias)."""
        kernel = getattr(self, name + "_kernel")
        y = jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(x.dtype))
        y = dropout_branch(y, x, self, name + "_kernel")
        if self.cfg.qkv_bias:
            y = y + getattr(self, name + "_bias")[...].astype(x.dtype)
        return y

    @jax.named_scope("qkv")
    def _qkv(self, x, cos, sin):
        """x [B,T,D] -> q [B,T,H,Dh], k, v [B,T,K,Dh], normalised and rotated."""
        cfg = self.cfg
        q = self._project(x, "q")
        k = self._project(x, "k")
        v = self._project(x, "v")
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps, cfg.norm_zero_centered)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps, cfg.norm_zero_centered)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    @jax.named_scope("out")
    def _output(self, x, o):
        """Attention output o [B,T,H,Dh] (gated by x [B,T,D] if configured) -> [B,T,D]."""
        cfg = self.cfg
        if cfg.attention_output_gate:
            gate = self._project(x, "gate")
            o = o * jax.nn.sigmoid(gate)
        o = checkpoint_name(o, "attn_out")
        out = jnp.einsum("bthk,hkd->btd", o, self.o_kernel[...].astype(x.dtype))
        out = dropout_branch(out, o, self, "o_kernel")
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(x.dtype)
        return out

    @jax.named_scope("attention")
    def __call__(self, x, cos, sin, positions, segment_ids):
        """x [B,T,D]; cos/sin [B,T,Dh]; positions/segment_ids [B,T] -> [B,T,D]."""
        cfg = self.cfg
        q, k, v = self._qkv(x, cos, sin)
        # Blockwise on one device; ring attention when the sequence is split over `context`.
        with jax.named_scope("core"):
            o = causal_attention(q, k, v, positions, segment_ids, block=cfg.runtime.attn_block,
                                 impl=cfg.runtime.attention_impl,
                                 splash_block=cfg.runtime.splash_block)
        return self._output(x, o)

    @jax.named_scope("attention")
    def extend(self, x, cos, sin, positions, segment_ids, cache: KVCache, slots: CacheSlots):
        """As `__call__` for T new tokens that also see every earlier token in `cache`; their
        keys and values are written at slots [index, index + T). Returns (out, new cache)."""
        cfg = self.cfg
        q, k, v = self._qkv(x, cos, sin)
        start = (0, slots.index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
        with jax.named_scope("core"):
            if slots.fresh:  # nothing earlier to see: causal attention among the new tokens
                o = causal_attention(q, k, v, positions, segment_ids,
                                     block=cfg.runtime.attn_block,
                                     impl=cfg.runtime.attention_impl,
                                     splash_block=cfg.runtime.splash_block)
            else:
                # One device: dense (one query) or blockwise (a prefill chunk); with `context`
                # > 1 the cache is split along its slots and partial results merge by
                # log-sum-exp.
                o = cached_attention(q, k_all, v_all, positions, slots.positions, segment_ids,
                                     slots.segment_ids, block=cfg.runtime.attn_block)
        return self._output(x, o), KVCache(k_all, v_all)
