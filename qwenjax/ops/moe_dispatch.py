"""Token routing and the dropless grouped expert FFN, beside a dense per-token reference.

Dimension letters: N tokens, D model, F expert width, E experts, k experts per token,
M = N*k routed rows, R padded rows, nb blocks of bm rows.

Routing follows `transformers` exactly: fp32 softmax over the router logits, top-k, and
renormalisation of the k weights iff `norm_topk_prob`.

The grouped FFN sorts the M routed rows by expert and runs SwiGLU per group:
- `ragged`: `jax.lax.ragged_dot` on the sorted rows (a real grouped GEMM on TPU/GPU).
- `blocked`: each group padded to a multiple of bm rows under the static bound
  R = M + E*(bm-1), and a scan over the blocks of bm rows, each with its expert's weights
  (`blocked_swiglu`); blocks past the last group are skipped. On XLA:CPU `ragged_dot` becomes a
  dense masked matmul over all E groups (~18x the useful work); this path does ~1x.
Both are exact (no token is dropped) and differentiable; `dense_moe_reference` is the test oracle.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qwenjax.errors import ConfigError
from qwenjax.ops.grouped_matmul import grouped_matmul
from qwenjax.sharding import current_mesh, target_platform

F32 = jnp.float32
KERNEL_OF = {"ragged": "xla", "megablox": "megablox"}  # grouped_matmul's kernel per impl


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
    """The grouped FFN for the target platform (the mesh's, not the host's: see sharding):
    megablox's Pallas kernels on TPU, `ragged_dot` on GPU, the blocked scan on CPU."""
    return {"cpu": "blocked", "tpu": "megablox"}.get(target_platform(), "ragged")


def grouped_ffn(x, weights, experts, w_gate, w_up, w_down, *, impl: str = "auto", block: int = 64):
    """Dropless MoE FFN. x [N,D], weights/experts [N,k], w_gate/w_up [E,D,F], w_down [E,F,D].

    Returns sum_j weights[n,j] * SwiGLU_{experts[n,j]}(x[n]) as [N,D] in x.dtype.
    """
    impl = default_impl() if impl == "auto" else impl
    mesh = current_mesh()
    if impl == "megablox" and mesh is not None and mesh.size > 1:
        # Outside a shard_map GSPMD partitions this FFN, and a Mosaic kernel cannot be
        # partitioned automatically: XLA's ragged dot takes its place.
        impl = "ragged"
    N, _ = x.shape
    k = experts.shape[1]
    E = w_gate.shape[0]
    if impl in ("ragged", "megablox"):
        with jax.named_scope("moe_dispatch"):
            plan = dispatch_plan(experts, E, 1)
            rows = gather_rows(x, plan.src_row // k, plan.pos)
        with jax.named_scope("moe_experts"):
            kernel = KERNEL_OF[impl]
            mm = lambda a, w: grouped_matmul(a, w, plan.group_sizes, 512, kernel)
            h = jax.nn.silu(mm(rows, w_gate)) * mm(rows, w_up)
            y = checkpoint_name(mm(h, w_down), "moe_rows")
    elif impl == "blocked":
        bm = block_rows(N * k // E, block)
        with jax.named_scope("moe_dispatch"):
            plan = dispatch_plan(experts, E, bm)
            rows = gather_rows(x, plan.src_row // k, plan.pos)  # [R,D], pad rows zero
            M = N * k
            row_weight = gather_rows(
                weights.astype(F32).reshape(M, 1), plan.src_row, plan.pos.reshape(M, 1)
            )
        with jax.named_scope("moe_experts"):
            y = blocked_swiglu(rows, row_weight[:, 0], plan.block_expert, w_gate, w_up, w_down,
                               bm)
            y = checkpoint_name(y, "moe_rows")
        # The rows carry their routing weights already. Combining with ones leaves combine's
        # weight gradient unused, so the backward pass needs no y (nor, under remat, its matmul).
        weights = jnp.ones_like(weights)
    else:
        raise ValueError(f"unknown grouped_ffn impl {impl!r}")
    with jax.named_scope("moe_combine"):
        return combine_rows(y, weights.astype(F32), plan.pos, plan.src_row).astype(x.dtype)


def over_token_chunks(fn, chunk: int):
    """`fn(*arrays)` over consecutive chunks of `chunk` tokens (the arrays' leading axis N), each
    chunk under `jax.checkpoint` in a scan, so one chunk's routed rows are live at a time
    (`runtime.moe_chunk_tokens`). fn's outputs: per-token arrays [c, ...] are joined back to
    [N, ...]; scalars (counts) are summed. 0, or a chunk of all tokens, is `fn` itself."""

    def chunked(*arrays):
        N = arrays[0].shape[0]
        if not chunk or chunk >= N:
            return fn(*arrays)
        if N % chunk:
            raise ConfigError(f"runtime.moe_chunk_tokens {chunk} does not divide the {N} tokens per device")
        split = lambda a: a.reshape(N // chunk, chunk, *a.shape[1:])
        out = jax.lax.map(jax.checkpoint(lambda parts: fn(*parts)), tuple(map(split, arrays)))
        join = lambda y: y.sum(0) if y.ndim == 1 else y.reshape(N, *y.shape[2:])
        return jax.tree.map(join, out)

    return chunked


def block_rows(mean_group: int, block: int) -> int:
    """Rows per block of the blocked grouped FFN: the power of two >= the mean rows per expert
    (at least 8), capped at `block` — padding stays small for tiny batches."""
    return int(min(block, max(8, 1 << max(0, mean_group - 1).bit_length())))


class DispatchPlan(NamedTuple):
    """Where each routed row goes. M = N*k routed rows, R >= M rows sorted by expert, each
    expert's group padded to a multiple of bm (bm = 1: no padding, R = M)."""

    pos: jax.Array  # [N,k] int32: the row of R holding token n's j-th expert choice
    src_row: jax.Array  # [R] int32: routed row n*k+j held by each row of R (M for padding)
    group_sizes: jax.Array  # [E] int32: routed rows per expert (unpadded)
    block_expert: jax.Array  # [R/bm] int32: each block's expert, E past the last group


def dispatch_plan(experts, E: int, bm: int) -> DispatchPlan:
    N, k = experts.shape
    M = N * k
    R = M if bm == 1 else -(-(M + E * (bm - 1)) // bm) * bm  # static bound on padded rows
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted position -> routed row
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    padded = -(-group_sizes // bm) * bm
    group_start = jnp.cumsum(group_sizes) - group_sizes
    padded_end = jnp.cumsum(padded)
    sorted_expert = flat[order]
    dest = (padded_end - padded)[sorted_expert] + jnp.arange(M) - group_start[sorted_expert]
    dest = dest.astype(jnp.int32)
    pos = jnp.zeros((M,), jnp.int32).at[order].set(dest).reshape(N, k)
    src_row = jnp.full((R,), M, jnp.int32).at[dest].set(order)
    block_expert = jnp.searchsorted(padded_end, jnp.arange(R // bm) * bm, side="right")
    block_expert = block_expert.astype(jnp.int32)
    return DispatchPlan(pos, src_row, group_sizes, block_expert)


# Dispatch and combine are permutations (plus zero padding), so each one's transpose is again a
# gather. Custom VJPs say so; autodiff would emit scatter-adds, which XLA:CPU runs serially.


@jax.custom_vjp
def gather_rows(x, src_token, pos):
    """x [N,D] -> rows [R,D]: row r = x[src_token[r]], zero where src_token[r] == N."""
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[src_token]


def _gather_rows_fwd(x, src_token, pos):
    return gather_rows(x, src_token, pos), (pos, x.shape[0])


def _gather_rows_bwd(res, d_rows):
    pos, _ = res
    dx = jnp.sum(d_rows[pos], axis=1)  # [N,k,D] -> [N,D]: each token's k copies
    return dx, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def combine_rows(y, weights, pos, src_row):
    """y [R,D], weights fp32 [N,k] -> fp32 [N,D]: sum_j weights[n,j] * y[pos[n,j]]."""
    return jnp.einsum("nkd,nk->nd", y[pos].astype(F32), weights)


def _combine_rows_fwd(y, weights, pos, src_row):
    return combine_rows(y, weights, pos, src_row), (y, weights, pos, src_row)


def _combine_rows_bwd(res, d_out):
    y, weights, pos, src_row = res
    N, k = weights.shape
    w_row = jnp.concatenate([weights.reshape(-1), jnp.zeros((1,), F32)])[src_row]  # [R]
    d_ext = jnp.concatenate([d_out, jnp.zeros((1, d_out.shape[1]), F32)])
    token = jnp.where(src_row < N * k, src_row // k, N)
    dy = (d_ext[token] * w_row[:, None]).astype(y.dtype)
    dw = jnp.einsum("nkd,nd->nk", y[pos].astype(F32), d_out)
    return dy, dw, None, None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


# The blocked SwiGLU, with a hand-written VJP. Measured on XLA:CPU (2 shared cores, interleaved
# runs) for one MoE layer's forward, remat and backward (M 4096, D 128, F 128, E 8, bm 64),
# against one batched matmul over all blocks with a weight copy per block (`w[block_expert]`:
# [R/bm,D,F] written and read per weight, as much again for the per-block weight gradients):
# the scan 0.85x the time, skipping empty blocks 0.82x, routing weights applied inside 0.75x,
# under balanced and skewed routing alike; bm 32 or 128 are slower than 64. Per-expert buffers
# of a fixed capacity C (no weight indexing) were no faster than the scan, and pad more rows.


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def blocked_swiglu(rows, row_weight, block_expert, w_gate, w_up, w_down, bm):
    """row_weight[r] * SwiGLU(rows[r]) with the weights of its block's expert -> fp32 [R,D]
    (weighted in fp32 and left there, so the combine sums unrounded products, as the DESIGN
    precision rule asks; measured: rounding them to bf16 doubles the bf16 KL to transformers).

    rows [R,D] are sorted by expert in blocks of bm rows, block b of expert `block_expert[b]`
    (E: an empty block, skipped; its rows come out zero); row_weight fp32 [R]. A scan over the
    blocks indexes each expert's weights in place. The VJP saves the gate and up
    pre-activations, sums the weight gradients per expert in the carry of the backward scan,
    and takes the row_weight gradient from the down projection's input gradient, so the
    backward pass needs no output rows."""
    return _blocked_fwd(rows, row_weight, block_expert, w_gate, w_up, w_down, bm)[0]


def _blocked_fwd(rows, row_weight, block_expert, w_gate, w_up, w_down, bm):
    (R, D), (E, _, F) = rows.shape, w_gate.shape

    def block(_, xs):
        x, s, e = xs

        def compute():
            g, u = x @ w_gate[e], x @ w_up[e]
            y = (jax.nn.silu(g) * u) @ w_down[e]
            return g, u, y.astype(F32) * s[:, None]

        empty = lambda: (jnp.zeros((bm, F), x.dtype),) * 2 + (jnp.zeros((bm, D), F32),)
        return None, jax.lax.cond(e < E, compute, empty)

    xs = (rows.reshape(R // bm, bm, D), row_weight.reshape(R // bm, bm), block_expert)
    _, (g, u, y) = jax.lax.scan(block, None, xs)
    return y.reshape(R, D), (rows, row_weight, block_expert, w_gate, w_up, w_down, g, u)


def _blocked_bwd(bm, res, dy):
    rows, row_weight, block_expert, w_gate, w_up, w_down, g, u = res
    (R, D), E = rows.shape, w_gate.shape[0]

    def block(dw, xs):
        x, s, g, u, dy, e = xs

        def compute():
            dx, ds, dw_e = _swiglu_bwd(x, s, g, u, dy, w_gate[e], w_up[e], w_down[e])
            return tuple(a.at[e].add(b.astype(F32)) for a, b in zip(dw, dw_e)), (dx, ds)

        return jax.lax.cond(e < E, compute, lambda: (dw, (jnp.zeros_like(x), jnp.zeros_like(s))))

    blocks = lambda a: a.reshape(R // bm, bm, a.shape[-1])
    dy = dy.astype(rows.dtype)  # the fp32 output's gradient, back in the compute dtype
    xs = (blocks(rows), row_weight.reshape(R // bm, bm), g, u, blocks(dy), block_expert)
    dw0 = tuple(jnp.zeros(w.shape, F32) for w in (w_gate, w_up, w_down))
    dw, (dx, ds) = jax.lax.scan(block, dw0, xs)
    dw_gate, dw_up, dw_down = (d.astype(w.dtype) for d, w in zip(dw, (w_gate, w_up, w_down)))
    return dx.reshape(R, D), ds.reshape(R), None, dw_gate, dw_up, dw_down


blocked_swiglu.defvjp(_blocked_fwd, _blocked_bwd)


def _swiglu_bwd(x, s, g, u, dy, w_gate, w_up, w_down):
    """VJP of y = s * (silu(g) * u) @ w_down, g = x @ w_gate, u = x @ w_up for one block
    x [bm,D], s [bm] -> (dx, ds, (d w_gate, d w_up, d w_down))."""
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    h = silu * u
    dh = dy @ w_down.T  # gradient of the unweighted h
    ds = jnp.sum((h * dh).astype(F32), axis=-1)
    dh = (dh * s[:, None]).astype(x.dtype)
    du = dh * silu
    dg = dh * u * sig * (1 + g * (1 - sig))  # silu'(g) = sig(g) * (1 + g * (1 - sig(g)))
    dx = dg @ w_gate.T + du @ w_up.T
    hs = (h * s[:, None]).astype(x.dtype)
    return dx, ds, (x.T @ dg, x.T @ du, hs.T @ dy)


def dense_moe_reference(x, weights, experts, w_gate, w_up, w_down):
    """Every expert on every token, combined with the routing weights: the test oracle."""
    E = w_gate.shape[0]
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w_gate)) * jnp.einsum("nd,edf->nef", x, w_up)
    y = jnp.einsum("nef,efd->ned", h, w_down)  # [N,E,D]
    combine = jnp.zeros((x.shape[0], E), F32).at[jnp.arange(x.shape[0])[:, None], experts].add(
        weights.astype(F32)
    )
    return jnp.einsum("ne,ned->nd", combine.astype(x.dtype), y)


def router_stats(router_logits, probs, experts, valid, dropped=0.0):
    """Per-layer sums for the load-balancing and z losses (combined across layers later).

    Returns fp32 (assignments per expert [E], router prob per expert [E], rows, sum of lse^2,
    routed rows dropped by capacity), counting only rows where `valid` [N] is true (as
    `transformers`' `load_balancing_loss_func`) except `dropped`, which counts every row.
    """
    E = probs.shape[-1]
    w = valid.astype(F32)
    counts = jnp.zeros((E,), F32).at[experts.reshape(-1)].add(jnp.repeat(w, experts.shape[1]))
    prob_sum = jnp.sum(probs * w[:, None], axis=0)
    z = jax.nn.logsumexp(router_logits.astype(F32), axis=-1)
    return counts, prob_sum, jnp.sum(w), jnp.sum(w * z * z), jnp.asarray(dropped, F32)
