"""Grouped-query self-attention: q/k/v projections (optional bias), per-head q/k RMSNorm,
RoPE (possibly partial), blockwise attention, optional per-head sigmoid output gate (Qwen3-Next,
Qwen3.5), output projection.

Dimension letters: B batch, T length, D model, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwenjax.config import ModelConfig
from qwenjax.model.layers import apply_rope, make_param, rms_norm
from qwenjax.ops.attention import attention


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K, Dh, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
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

    def _project(self, x, kernel, bias_name):
        y = jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(x.dtype))
        if self.cfg.qkv_bias:
            y = y + getattr(self, bias_name)[...].astype(x.dtype)
        return y

    def __call__(self, x, cos, sin, positions, segment_ids):
        """x [B,T,D]; cos/sin [B,T,Dh]; positions/segment_ids [B,T] -> [B,T,D]."""
        cfg = self.cfg
        q = self._project(x, self.q_kernel, "q_bias")  # [B,T,H,Dh]
        k = self._project(x, self.k_kernel, "k_bias")  # [B,T,K,Dh]
        v = self._project(x, self.v_kernel, "v_bias")
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps, cfg.norm_zero_centered)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps, cfg.norm_zero_centered)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(
            q, k, v, q_pos=positions, kv_pos=positions, q_seg=segment_ids, kv_seg=segment_ids,
            causal=True, block_q=cfg.attn_block, block_kv=cfg.attn_block,
        )
        if cfg.attention_output_gate:
            gate = self._project(x, self.gate_kernel, "gate_bias")
            o = o * jax.nn.sigmoid(gate)
        o = checkpoint_name(o, "attn_out")
        out = jnp.einsum("bthk,hkd->btd", o, self.o_kernel[...].astype(x.dtype))
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(x.dtype)
        return out
