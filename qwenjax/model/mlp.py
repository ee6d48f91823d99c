"""Feed-forward blocks: the dense SwiGLU MLP and the routed MoE block with optional shared expert.

Dimension letters: B batch, T length, N = B*T tokens, D model, F width, E experts, k top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.model import hooks
from qwenjax.model.layers import make_param
from qwenjax.model.lora import dropout_branch
from qwenjax.ops.expert_parallel import expert_parallel_ffn, single_device_mesh
from qwenjax.ops.moe_dispatch import grouped_ffn, over_token_chunks, route, router_stats
from qwenjax.sharding import current_mesh, mesh_axes

F32 = jnp.float32


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, width: int, *, rngs: nnx.Rngs):
        D, pd = cfg.hidden_size, cfg.runtime.param_dtype
        self.gate_kernel = make_param(rngs, (D, width), ("embed", "mlp"), pd)
        self.up_kernel = make_param(rngs, (D, width), ("embed", "mlp"), pd)
        self.down_kernel = make_param(rngs, (width, D), ("mlp", "embed"), pd)

    @jax.named_scope("mlp")
    def __call__(self, x):
        """x [..., D] -> [..., D]: SwiGLU (with adapter dropout when training with it)."""
        c = lambda p: p[...].astype(x.dtype)
        w = (c(self.gate_kernel), c(self.up_kernel), c(self.down_kernel))  # swiglu, written out
        gate = dropout_branch(x @ w[0], x, self, "gate_kernel")
        up = dropout_branch(x @ w[1], x, self, "up_kernel")
        h = jax.nn.silu(gate) * up
        return dropout_branch(h @ w[2], h, self, "down_kernel")


class MoE(nnx.Module):
    """Routed experts (dropless) plus, if configured, a shared expert behind a sigmoid gate."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F, pd = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.runtime.param_dtype
        self.cfg = cfg
        self.router_kernel = make_param(rngs, (D, E), ("embed", "router_experts"), pd)
        self.gate_kernel = make_param(rngs, (E, D, F), ("experts", "expert_embed", "expert_mlp"), pd)
        self.up_kernel = make_param(rngs, (E, D, F), ("experts", "expert_embed", "expert_mlp"), pd)
        self.down_kernel = make_param(rngs, (E, F, D), ("experts", "expert_mlp", "expert_embed"), pd)
        if cfg.shared_expert_intermediate_size:
            self.shared = MLP(cfg, cfg.shared_expert_intermediate_size, rngs=rngs)
            self.shared_gate_kernel = make_param(rngs, (D, 1), ("embed", None), pd)

    @jax.named_scope("moe")
    def __call__(self, x, valid):
        """x [B,T,D], valid [B,T] (rows counted in router statistics) -> (y [B,T,D], stats)."""
        cfg = self.cfg
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        c = lambda p: p[...].astype(x.dtype)
        with jax.named_scope("moe_router"):
            # Router in fp32 (transformers uses the compute dtype): fewer bf16 routing flips.
            logits = xf.astype(jnp.float32) @ self.router_kernel[...].astype(jnp.float32)  # [N,E]
            logits = hooks.tap("router_logits", logits.reshape(B, T, -1)).reshape(B * T, -1)
            weights, experts, probs = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        w = (c(self.gate_kernel), c(self.up_kernel), c(self.down_kernel))
        y, dropped = self._experts(x, weights, experts, w)
        if cfg.shared_expert_intermediate_size:
            with jax.named_scope("shared_expert"):
                gate = jax.nn.sigmoid(xf @ c(self.shared_gate_kernel))
                y = y + gate * self.shared(xf)
        with jax.named_scope("moe_router"):
            stats = router_stats(logits, probs, experts, valid.reshape(-1), dropped)
        return y.reshape(B, T, D), stats

    def _experts(self, x, weights, experts, w):
        """-> (routed expert output [B*T,D], dropped routed rows). When the current mesh splits
        the tokens (or in capacity mode), each device sorts its own rows and, with `expert` > 1,
        sends them to their experts by all-to-all (`expert_parallel_ffn`); GSPMD would sort all
        tokens globally (measured: it replicates them, 147 GB of temporaries at 256K tokens).
        Unsplit tokens run the dropless grouped FFN directly."""
        B, T, D = x.shape
        k = weights.shape[-1]
        capacity, impl = self.cfg.runtime.moe_capacity_factor, self.cfg.runtime.moe_impl
        mesh = current_mesh()
        if mesh is None and capacity:
            mesh = single_device_mesh()  # capacity mode runs the expert-parallel code anyway
        batch, length = mesh_axes("batch", B), mesh_axes("length", T)  # () without a mesh
        # Tokens replicated over the expert devices cannot be sent to their experts.
        unsendable = mesh is not None and mesh.shape["expert"] > 1 and "expert" not in batch + length
        if capacity and unsendable:
            raise ValueError(f"capacity mode needs the batch {B}x{T} split over expert")
        chunk = self.cfg.runtime.moe_chunk_tokens
        if not capacity and (unsendable or not (batch or length)):
            # Tokens whole on every device, or replicated over experts: the dropless grouped FFN
            # as it is (GSPMD partitions it in the latter case; chunks only for whole tokens).
            ffn = lambda x, weights, experts: grouped_ffn(x, weights, experts, *w, impl=impl)
            if not unsendable:
                ffn = over_token_chunks(ffn, chunk)
            return ffn(x.reshape(B * T, D), weights, experts), jnp.zeros((), F32)
        tokens = (batch or None, length or None)
        y, dropped = expert_parallel_ffn(
            x, weights.reshape(B, T, k), experts.reshape(B, T, k), *w, mesh=mesh,
            token_spec=tokens, capacity_factor=capacity, impl=impl,
            buffer_factor=self.cfg.runtime.moe_buffer_factor,
            embed_axes=mesh_axes("expert_embed", D), chunk_tokens=chunk,
        )
        return y.reshape(B * T, D), dropped


def empty_router_stats(num_experts: int):
    """Router statistics of a layer without experts (zeros, same structure as `router_stats`)."""
    z = jnp.zeros((max(num_experts, 1),), jnp.float32)
    s = jnp.zeros((), jnp.float32)
    return z, z, s, s, s
