"""Gated DeltaNet (linear attention) layer of Qwen3-Next / Qwen3.5.

x -> projections q, k [B,T,Hk,Dk], v, z [B,T,Hv,Dv], b, a [B,T,Hv]
  -> causal depthwise conv (kernel K) + SiLU over q, k, v
  -> beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias)   (fp32)
  -> gated delta rule (q, k l2-normalised; q/k heads repeated to Hv) -> o [B,T,Hv,Dv]
  -> RMSNorm(o) * SiLU(z) (gated norm, plain weight) -> output projection.

Dimension letters: B batch, T length, D model, Hk/Hv key/value heads, Dk/Dv head dims, K conv.
The conv weight is kept as three parameters (q, k, v channels) so each can be sharded by heads;
`hf/names.py` splits and joins HF's single `conv1d.weight [C, 1, K]`. Packed documents: the conv
window and the recurrent state both restart at each document start (segment ids).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.model.layers import make_param
from qwenjax.ops.delta_rule import delta_rule_chunked

F32 = jnp.float32


def causal_conv(x, weight, segment_ids):
    """Depthwise causal conv: x [B,T,H,Dh], weight [K,H,Dh] -> [B,T,H,Dh] (in x.dtype).

    out[t] = sum_j weight[j] * x[t - (K-1) + j], where inputs from an earlier document (or
    before the sequence) count as zero, exactly as if each document were convolved alone.
    """
    K = weight.shape[0]
    T = x.shape[1]
    out = jnp.zeros(x.shape, F32)
    for j in range(K):  # K is 4: a static unroll over kernel taps, not over tokens
        shift = K - 1 - j
        if shift >= T:
            continue
        xs = jnp.pad(x, ((0, 0), (shift, 0), (0, 0), (0, 0)))[:, :T]
        same = jnp.pad(segment_ids, ((0, 0), (shift, 0)), constant_values=-1)[:, :T] == segment_ids
        out = out + jnp.where(same[:, :, None, None], xs, 0).astype(F32) * weight[j].astype(F32)
    return out.astype(x.dtype)


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, pd = cfg.hidden_size, cfg.param_dtype
        Hk, Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        Dk, Dv, K = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
        self.cfg = cfg
        self.q_kernel = make_param(rngs, (D, Hk, Dk), ("embed", "linear_k_heads", "head_dim"), pd)
        self.k_kernel = make_param(rngs, (D, Hk, Dk), ("embed", "linear_k_heads", "head_dim"), pd)
        self.v_kernel = make_param(rngs, (D, Hv, Dv), ("embed", "linear_v_heads", "head_dim"), pd)
        self.z_kernel = make_param(rngs, (D, Hv, Dv), ("embed", "linear_v_heads", "head_dim"), pd)
        self.b_kernel = make_param(rngs, (D, Hv), ("embed", "linear_v_heads"), pd)
        self.a_kernel = make_param(rngs, (D, Hv), ("embed", "linear_v_heads"), pd)
        self.q_conv = make_param(rngs, (K, Hk, Dk), ("conv", "linear_k_heads", "head_dim"), pd)
        self.k_conv = make_param(rngs, (K, Hk, Dk), ("conv", "linear_k_heads", "head_dim"), pd)
        self.v_conv = make_param(rngs, (K, Hv, Dv), ("conv", "linear_v_heads", "head_dim"), pd)
        self.A_log = nnx.Param(jnp.log(jnp.linspace(1.0, 16.0, Hv)).astype(pd), axes=("linear_v_heads",))
        self.dt_bias = make_param(rngs, (Hv,), ("linear_v_heads",), pd, "ones")
        self.norm = make_param(rngs, (Dv,), ("norm",), pd, "ones")
        self.out_kernel = make_param(rngs, (Hv, Dv, D), ("linear_v_heads", "head_dim", "embed"), pd)

    def __call__(self, x, segment_ids, valid):
        """x [B,T,D]; segment_ids/valid [B,T] -> [B,T,D]."""
        cfg = self.cfg
        dt = x.dtype
        c = lambda p: p[...].astype(dt)  # noqa: E731
        x = x * valid[:, :, None].astype(dt)  # padding contributes nothing, as in transformers
        q = jnp.einsum("btd,dhk->bthk", x, c(self.q_kernel))
        k = jnp.einsum("btd,dhk->bthk", x, c(self.k_kernel))
        v = jnp.einsum("btd,dhk->bthk", x, c(self.v_kernel))
        z = jnp.einsum("btd,dhk->bthk", x, c(self.z_kernel))
        b = jnp.einsum("btd,dh->bth", x, c(self.b_kernel))
        a = jnp.einsum("btd,dh->bth", x, c(self.a_kernel))
        q = jax.nn.silu(causal_conv(q, self.q_conv[...], segment_ids))
        k = jax.nn.silu(causal_conv(k, self.k_conv[...], segment_ids))
        v = jax.nn.silu(causal_conv(v, self.v_conv[...], segment_ids))
        beta = jax.nn.sigmoid(b)
        g = -jnp.exp(self.A_log[...].astype(F32)) * jax.nn.softplus(
            a.astype(F32) + self.dt_bias[...].astype(F32)
        )
        repeat = cfg.linear_num_value_heads // cfg.linear_num_key_heads
        if repeat > 1:  # value head h reads key head h // repeat
            q, k = jnp.repeat(q, repeat, axis=2), jnp.repeat(k, repeat, axis=2)
        o, _ = delta_rule_chunked(q, k, v, g, beta, use_qk_l2norm=True, segment_ids=segment_ids)
        # Gated RMSNorm: normalise o in fp32, scale by w in the compute dtype, gate by SiLU(z).
        of = o.astype(F32)
        of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        o = self.norm[...].astype(dt) * of.astype(dt)
        o = (o.astype(F32) * jax.nn.silu(z.astype(F32))).astype(dt)
        return jnp.einsum("bthk,hkd->btd", o, c(self.out_kernel))
