"""Feed-forward blocks: the dense SwiGLU MLP and the routed MoE block with optional shared expert.

Dimension letters: B batch, T length, N = B*T tokens, D model, F width, E experts, k top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.model.layers import make_param
from qwenjax.ops.moe_dispatch import grouped_ffn, route, router_stats, swiglu


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs):
        D, pd = cfg.hidden_size, cfg.param_dtype
        self.gate_kernel = make_param(rngs, (D, width), ("embed", "mlp"), pd)
        self.up_kernel = make_param(rngs, (D, width), ("embed", "mlp"), pd)
        self.down_kernel = make_param(rngs, (width, D), ("mlp", "embed"), pd)

    def __call__(self, x):
        c = lambda p: p[...].astype(x.dtype)  # noqa: E731
        return swiglu(x, c(self.gate_kernel), c(self.up_kernel), c(self.down_kernel))


class MoE(nnx.Module):
    """Routed experts (dropless) plus, if configured, a shared expert behind a sigmoid gate."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F, pd = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.param_dtype
        self.cfg = cfg
        self.router_kernel = make_param(rngs, (D, E), ("embed", "router_experts"), pd)
        self.gate_kernel = make_param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), pd)
        self.up_kernel = make_param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), pd)
        self.down_kernel = make_param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), pd)
        if cfg.shared_expert_intermediate_size:
            self.shared = MLP(cfg, cfg.shared_expert_intermediate_size, rngs=rngs)
            self.shared_gate_kernel = make_param(rngs, (D, 1), ("embed", None), pd)

    def __call__(self, x, valid):
        """x [B,T,D], valid [B,T] (rows counted in router statistics) -> (y [B,T,D], stats)."""
        cfg = self.cfg
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        c = lambda p: p[...].astype(x.dtype)  # noqa: E731
        # Router in fp32 (transformers uses the compute dtype): fewer bf16 routing flips.
        logits = xf.astype(jnp.float32) @ self.router_kernel[...].astype(jnp.float32)  # [N,E]
        weights, experts, probs = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        y = grouped_ffn(
            xf, weights, experts,
            c(self.gate_kernel), c(self.up_kernel), c(self.down_kernel),
        )
        if cfg.shared_expert_intermediate_size:
            gate = jax.nn.sigmoid(xf @ c(self.shared_gate_kernel))
            y = y + gate * self.shared(xf)
        stats = router_stats(logits, probs, experts, valid.reshape(-1))
        return y.reshape(B, T, D), stats


def empty_router_stats(num_experts: int):
    """Router statistics of a layer without experts (zeros, same structure as `router_stats`)."""
    z = jnp.zeros((max(num_experts, 1),), jnp.float32)
    s = jnp.zeros((), jnp.float32)
    return z, z, s, s
