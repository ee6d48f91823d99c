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

`extend` is the inference path: it continues a `RecurrentState` (the last K-1 pre-conv q/k/v
inputs and the delta-rule state) over T new tokens, so prefill chunks and decoding steps give
exactly what one pass over the whole sequence gives.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.model.layers import make_param
from qwenjax.model.lora import dropout_branch
from qwenjax.model.sequence_ops import conv, delta_rule, global_tail
from qwenjax.ops.delta_rule import causal_conv, delta_rule_chunked, delta_rule_step

F32 = jnp.float32


class RecurrentState(NamedTuple):
    """One Gated DeltaNet layer's cache: the conv windows (the last K-1 pre-conv inputs,
    [B,K-1,Hk,Dk] for q and k, [B,K-1,Hv,Dv] for v, compute dtype) and the delta-rule state
    [B,Hv,Dk,Dv] (fp32)."""

    q_window: jax.Array
    k_window: jax.Array
    v_window: jax.Array
    state: jax.Array


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, pd = cfg.hidden_size, cfg.runtime.param_dtype
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

    @jax.named_scope("proj")
    def _project(self, x, valid):
        """x [B,T,D] -> pre-conv q, k, v, gate z, and fp32 beta, g [B,T,Hv]."""
        dt = x.dtype
        c = lambda p: p[...].astype(dt)
        x = x * valid[:, :, None].astype(dt)  # padding contributes nothing, as in transformers
        def project(name, eq):
            y = jnp.einsum(eq, x, c(getattr(self, name + "_kernel")))
            return dropout_branch(y, x, self, name + "_kernel")

        q, k, v, z = (project(n, "btd,dhk->bthk") for n in "qkvz")
        b, a = project("b", "btd,dh->bth"), project("a", "btd,dh->bth")
        beta = jax.nn.sigmoid(b)
        g = -jnp.exp(self.A_log[...].astype(F32)) * jax.nn.softplus(
            a.astype(F32) + self.dt_bias[...].astype(F32)
        )
        return q, k, v, z, beta, g

    @jax.named_scope("out")
    def _output(self, o, z):
        """Delta-rule output o [B,T,Hv,Dv], gate z -> [B,T,D] in z's dtype."""
        dt = z.dtype
        # Gated RMSNorm: normalise o in fp32, scale by w in the compute dtype, gate by SiLU(z).
        of = o.astype(F32)
        of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        o = self.norm[...].astype(dt) * of.astype(dt)
        o = (o.astype(F32) * jax.nn.silu(z.astype(F32))).astype(dt)
        out = jnp.einsum("bthk,hkd->btd", o, self.out_kernel[...].astype(dt))
        return dropout_branch(out, o, self, "out_kernel")

    def _mix(self, q, k, v, g, beta, segment_ids, initial_state=None):
        """Pre-conv q, k, v over a whole sequence: causal conv + SiLU, key heads repeated to the
        value heads, gated delta rule -> (o [B,T,Hv,Dv], final state). Both the conv and the
        delta rule run sequence-parallel when the sequence is split over `context`."""
        with jax.named_scope("conv"):
            q = jax.nn.silu(conv(q, self.q_conv[...], segment_ids, "linear_k_heads"))
            k = jax.nn.silu(conv(k, self.k_conv[...], segment_ids, "linear_k_heads"))
            v = jax.nn.silu(conv(v, self.v_conv[...], segment_ids, "linear_v_heads"))
        repeat = self.cfg.linear_num_value_heads // self.cfg.linear_num_key_heads
        if repeat > 1:  # value head h reads key head h // repeat
            q, k = jnp.repeat(q, repeat, axis=2), jnp.repeat(k, repeat, axis=2)
        with jax.named_scope("delta_rule"):
            return delta_rule(q, k, v, g, beta, segment_ids, initial_state)

    @jax.named_scope("gdn")
    def __call__(self, x, segment_ids, valid):
        """x [B,T,D]; segment_ids/valid [B,T] -> [B,T,D]."""
        q, k, v, z, beta, g = self._project(x, valid)
        o, _ = self._mix(q, k, v, g, beta, segment_ids)
        return self._output(o, z)

    @jax.named_scope("gdn")
    def extend(self, x, segment_ids, valid, cache: RecurrentState, *, fresh: bool = False,
               history: bool = False):
        """As `__call__` for T new tokens continuing the sequence held in `cache` (one document
        per row; padding, being zeroed, leaves a zero state zero). Returns (out, new cache).

        fresh: `cache` is empty (its contents are ignored) and these are a whole prompt in the
        token layout (with `context` > 1, split over it): the full-sequence path runs
        (sequence-parallel conv and delta rule) and the new cache keeps its final state and the
        last K-1 pre-conv inputs in global order.

        history: also return the cache after each of the T tokens (a RecurrentState whose arrays
        have a T axis after B), for speculative decoding to keep the state at the last accepted
        draft. The tokens then run one delta-rule step at a time, as decoding does.
        """
        q, k, v, z, beta, g = self._project(x, valid)
        q_pre, k_pre, v_pre = q, k, v
        if fresh:
            o, state = self._mix(q, k, v, g, beta, segment_ids)
            windows = [_last_window(w, new) for new, w in
                       ((q, cache.q_window), (k, cache.k_window), (v, cache.v_window))]
            return self._output(o, z), RecurrentState(*windows, state)
        T = x.shape[1]
        convolved, windows = [], []
        for new, window, weight in ((q, cache.q_window, self.q_conv),
                                    (k, cache.k_window, self.k_conv),
                                    (v, cache.v_window, self.v_conv)):
            seq = jnp.concatenate([window.astype(new.dtype), new], axis=1)  # [B,K-1+T,...]
            ones = jnp.ones(seq.shape[:2], jnp.int32)  # the window is this row's own past
            convolved.append(jax.nn.silu(causal_conv(seq, weight[...], ones)[:, -T:]))
            windows.append(seq[:, seq.shape[1] - window.shape[1]:].astype(window.dtype))
        q, k, v = convolved
        if history:
            def one(state, xs):
                o, state = delta_rule_step(*xs, state)
                return state, (o, state)

            xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
            state, (o, states) = jax.lax.scan(one, cache.state, xs)
            W = cache.q_window.shape[1]
            seqs = [jnp.concatenate([w.astype(n.dtype), n], axis=1).astype(w.dtype) for w, n in
                    ((cache.q_window, q_pre), (cache.k_window, k_pre), (cache.v_window, v_pre))]
            after = [jnp.stack([s[:, j + 1:j + 1 + W] for j in range(T)], axis=1) for s in seqs]
            hist = RecurrentState(*after, jnp.moveaxis(states, 0, 1))
            return self._output(jnp.moveaxis(o, 0, 1), z), RecurrentState(*windows, state), hist
        if T == 1:
            o, state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache.state)
            o = o[:, None]
        else:
            o, state = delta_rule_chunked(q, k, v, g, beta, initial_state=cache.state,
                                          segment_ids=segment_ids)
        return self._output(o, z), RecurrentState(*windows, state)


def _last_window(window, new):
    """The conv window [B,K-1,...] after a fresh sequence `new` [B,T,...] (token layout): its
    last K-1 inputs in global order, zeros first if T < K-1 (nothing came before)."""
    W, T = window.shape[1], new.shape[1]
    tail = global_tail(new, min(W, T)).astype(window.dtype)
    return jnp.concatenate([jnp.zeros_like(window[:, T:]), tail], axis=1) if T < W else tail
