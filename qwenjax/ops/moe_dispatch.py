"""Token routing and the dropless grouped expert FFN, beside a dense per-token reference.

Dimension letters: N tokens, D model, F expert width, E experts, k experts per token,
M = N*k routed rows, R padded rows, nb blocks of bm rows.

Routing follows `transformers` exactly: fp32 softmax over the router logits, top-k, and
renormalisation of the k weights iff `norm_topk_prob`.

The grouped FFN sorts the M routed rows by expert and runs SwiGLU per group:
- `ragged`: `jax.lax.ragged_dot` on the sorted rows (a real grouped GEMM on TPU/GPU).
- `blocked`: each group padded to a multiple of bm rows under the static bound
  R = M + E*(bm-1), and one batched matmul with per-block expert weights. On XLA:CPU `ragged_dot`
  becomes a dense masked matmul over all E groups (~18x the useful work); this path does ~1x.
Both are exact (no token is dropped) and differentiable; `dense_moe_reference` is the test oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def route(router_logits, top_k: int, norm_topk_prob: bool):
    """router_logits [N,E] -> (weights fp32 [N,k], experts int32 [N,k], probs fp32 [N,E])."""
    probs = jax.nn.softmax(router_logits.astype(F32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def swiglu(x, w_gate, w_up, w_down):
    """Dense SwiGLU: x [..., D], w_gate/w_up [D, F], w_down [F, D]."""
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def default_impl() -> str:
    return "blocked" if jax.default_backend() == "cpu" else "ragged"


def grouped_ffn(x, weights, experts, w_gate, w_up, w_down, *, impl: str = "auto", block: int = 64):
    """Dropless MoE FFN. x [N,D], weights/experts [N,k], w_gate/w_up [E,D,F], w_down [E,F,D].

    Returns sum_j weights[n,j] * SwiGLU_{experts[n,j]}(x[n]) as [N,D] in x.dtype.
    """
    impl = default_impl() if impl == "auto" else impl
    N, D = x.shape
    k = experts.shape[1]
    E = w_gate.shape[0]
    flat = experts.reshape(-1)  # [M]
    order = jnp.argsort(flat, stable=True)  # sorted position -> routed row
    token = order // k  # sorted position -> token
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[token]  # [M,D] sorted by expert
    if impl == "ragged":
        h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, group_sizes)) * jax.lax.ragged_dot(
            xs, w_up, group_sizes
        )
        ys = jax.lax.ragged_dot(h, w_down, group_sizes)
    elif impl == "blocked":
        ys = _blocked_swiglu(xs, group_sizes, w_gate, w_up, w_down, block)
    else:
        raise ValueError(f"unknown grouped_ffn impl {impl!r}")
    # Combine the k expert outputs of each token in fp32, cast once.
    w_sorted = weights.reshape(-1)[order].astype(F32)
    out = jnp.zeros((N, D), F32).at[token].add(ys.astype(F32) * w_sorted[:, None])
    return out.astype(x.dtype)


def _blocked_swiglu(xs, group_sizes, w_gate, w_up, w_down, block):
    """SwiGLU over rows sorted by expert: pad groups to bm, batched matmul per block."""
    M, D = xs.shape
    E = w_gate.shape[0]
    # A block size near the mean group size keeps padding small for tiny batches.
    bm = int(min(block, max(8, 1 << max(0, (M // E - 1)).bit_length())))
    R = -(-(M + E * (bm - 1)) // bm) * bm  # static bound on padded rows
    nb = R // bm
    padded = -(-group_sizes // bm) * bm
    group_start = jnp.cumsum(group_sizes) - group_sizes
    padded_start = jnp.cumsum(padded) - padded
    expert_of_row = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=M)
    dest = padded_start[expert_of_row] + jnp.arange(M) - group_start[expert_of_row]  # [M]
    buf = jnp.zeros((R, D), xs.dtype).at[dest].set(xs).reshape(nb, bm, D)
    # Blocks past the last group get expert E-1 and only zero rows; their output is never read.
    block_expert = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(padded), jnp.arange(nb) * bm, side="right"), E - 1
    )
    g = jnp.einsum("nbd,ndf->nbf", buf, w_gate[block_expert])
    u = jnp.einsum("nbd,ndf->nbf", buf, w_up[block_expert])
    y = jnp.einsum("nbf,nfd->nbd", jax.nn.silu(g) * u, w_down[block_expert])
    return y.reshape(R, -1)[dest]


def dense_moe_reference(x, weights, experts, w_gate, w_up, w_down):
    """Every expert on every token, combined with the routing weights: the test oracle."""
    E = w_gate.shape[0]
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w_gate)) * jnp.einsum("nd,edf->nef", x, w_up)
    y = jnp.einsum("nef,efd->ned", h, w_down)  # [N,E,D]
    combine = jnp.zeros((x.shape[0], E), F32).at[jnp.arange(x.shape[0])[:, None], experts].add(
        weights.astype(F32)
    )
    return jnp.einsum("ne,ned->nd", combine.astype(x.dtype), y)


def router_stats(router_logits, probs, experts, valid):
    """Per-layer sums for the load-balancing and z losses (combined across layers later).

    Returns fp32 (assignments per expert [E], router prob per expert [E], rows, sum of lse^2),
    counting only rows where `valid` [N] is true, as `transformers`' `load_balancing_loss_func`.
    """
    E = probs.shape[-1]
    w = valid.astype(F32)
    counts = jnp.zeros((E,), F32).at[experts.reshape(-1)].add(jnp.repeat(w, experts.shape[1]))
    prob_sum = jnp.sum(probs * w[:, None], axis=0)
    z = jax.nn.logsumexp(router_logits.astype(F32), axis=-1)
    return counts, prob_sum, jnp.sum(w), jnp.sum(w * z * z)
