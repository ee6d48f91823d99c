"""Grouped matmul for MoE experts: y[r] = x[r] @ w[g(r)] over rows sorted by group, with a
weight gradient whose memory is one block of rows and whose work is the real rows.

`jax.lax.ragged_dot` is the forward and the input gradient (both lower to XLA:TPU's grouped
matmul kernel, `tpu_custom_call:ragged-dot`). Its own weight gradient, a ragged *contracting*
dimension, does not: XLA:TPU (libtpu 0.0.42) lowers it as a masked dense product per group and
materialises [G, rows, D] and [G, rows, F]; for qwen3-235b-a22b on v5p-128 (8 local experts, a
dropless receive buffer of 524,288 rows) that was 60 GiB of temporaries per device, and G times
the FLOPs of the buffer. Here the weight gradient walks the real rows instead: block i of bm
rows belongs to one group, a `while_loop` runs over the ~rows/bm + G blocks that hold rows, and
each adds x_blk^T dy_blk (fp32 accumulation) into its group's slice.

Rows past sum(group_sizes) belong to no group: forward and gradients give them zeros, as
`ragged_dot` does.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

F32 = jnp.float32


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(x, w, group_sizes, bm: int = 512):
    """x [R,K] rows sorted by group, w [G,K,N], group_sizes [G] int32 -> [R,N] in x.dtype."""
    return jax.lax.ragged_dot(x, w, group_sizes)


def _fwd(x, w, group_sizes, bm):
    return jax.lax.ragged_dot(x, w, group_sizes), (x, w, group_sizes)


def _bwd(bm, res, dy):
    x, w, group_sizes = res
    dx = jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), group_sizes)
    dw = weight_grad(x, dy, group_sizes, w.shape[0], bm).astype(w.dtype)
    return dx, dw, None


grouped_matmul.defvjp(_fwd, _bwd)


def weight_grad(x, dy, group_sizes, groups: int, bm: int):
    """dw[g] = sum over the rows r of group g of x[r]^T dy[r]: [G,K,N] fp32."""
    R, K = x.shape
    N = dy.shape[1]
    bm = min(bm, R)
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    blocks = -(-sizes // bm)  # blocks per group
    first_block = jnp.cumsum(blocks) - blocks

    def body(carry):
        i, dw = carry
        g = jnp.searchsorted(first_block + blocks, i, side="right").astype(jnp.int32)
        row0 = starts[g] + (i - first_block[g]) * bm  # this block's rows: [row0, end)
        end = jnp.minimum(row0 + bm, starts[g] + sizes[g])
        at = jnp.clip(row0, 0, R - bm)  # a window inside the buffer; mask what is not ours
        rows = at + jnp.arange(bm)
        keep = ((rows >= row0) & (rows < end))[:, None]
        xb = jnp.where(keep, jax.lax.dynamic_slice_in_dim(x, at, bm), 0)
        yb = jax.lax.dynamic_slice_in_dim(dy, at, bm)
        part = jnp.einsum("rk,rn->kn", xb, yb, preferred_element_type=F32)
        return i + 1, dw.at[g].add(part)

    dw = jnp.zeros((groups, K, N), F32)
    _, dw = jax.lax.while_loop(lambda c: c[0] < jnp.sum(blocks), body, (jnp.int32(0), dw))
    return dw


@jax.custom_vjp
def permute_rows(x, order, inverse):
    """out[r] = x[order[r]] for a permutation `order` whose inverse is `inverse`. Both ways are
    gathers: autodiff of a gather is a scatter-add, which XLA:TPU runs on 32-bit copies of a
    16-bit buffer (measured: four 8 GiB u32 buffers per device for a [524288,4096] bf16 MoE
    receive buffer)."""
    return x[order]


def _permute_fwd(x, order, inverse):
    return x[order], inverse


def _permute_bwd(inverse, g):
    return g[inverse], None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)
