"""Grouped matmul for MoE experts: y[r] = x[r] @ w[g(r)] over rows sorted by group.

Two kernels, one custom VJP:
- "xla": `jax.lax.ragged_dot` for the forward and the input gradient (XLA:TPU and XLA:GPU lower
  it to their grouped-matmul kernels, `tpu_custom_call:ragged-dot`). Its own weight gradient, a
  ragged *contracting* dimension, is not used: XLA:TPU (libtpu 0.0.42) lowers that as a masked
  dense product per group and materialises [G, rows, D] and [G, rows, F] (for qwen3-235b-a22b
  on v5p-128, 8 local experts and a 524,288-row receive buffer, 60 GiB per device, and G times
  the FLOPs). Here the weight gradient walks the real rows instead: block i of bm rows belongs
  to one group, a `while_loop` runs over the ~rows/bm + G blocks that hold rows, and each adds
  x_blk^T dy_blk (fp32 accumulation) into its group's slice.
- "megablox": the Pallas TPU kernels of jax's megablox, `gmm` (forward; input gradient with
  the weights transposed) and `tgmm` (weight gradient), tiles from `megablox_tiling`. Off TPU
  they run in Pallas interpret mode (the CPU tests).

Rows past sum(group_sizes) belong to no group: forward and gradients give them zeros, as
`ragged_dot` does (megablox leaves them unwritten; they are masked).
"""

from __future__ import annotations

import importlib
from functools import partial

import jax
import jax.numpy as jnp

from qwenjax.sharding import target_platform

F32 = jnp.float32
KERNELS = ("xla", "megablox")


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def grouped_matmul(x, w, group_sizes, bm: int = 512, kernel: str = "xla"):
    """x [R,K] rows sorted by group, w [G,K,N], group_sizes [G] int32 -> [R,N] in x.dtype."""
    return _forward(x, w, group_sizes, kernel)


def _forward(x, w, group_sizes, kernel):
    if kernel == "megablox":
        y = _megablox().gmm(x, w, group_sizes, x.dtype, megablox_tiling(*x.shape, w.shape[2]),
                            interpret=_interpret())
        return _zero_tail(y, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes)


def _fwd(x, w, group_sizes, bm, kernel):
    return _forward(x, w, group_sizes, kernel), (x, w, group_sizes)


def _bwd(bm, kernel, res, dy):
    x, w, group_sizes = res
    if kernel == "megablox":
        mb, interpret = _megablox(), _interpret()
        R, K = x.shape
        N = w.shape[2]
        dx = mb.gmm(dy, w, group_sizes, x.dtype, megablox_tiling(R, N, K), transpose_rhs=True,
                    interpret=interpret)
        dw = mb.tgmm(x.swapaxes(0, 1), dy, group_sizes, F32, megablox_tiling(R, K, N),
                     interpret=interpret)
        return _zero_tail(dx, group_sizes), dw.astype(w.dtype), None
    dx = jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), group_sizes).astype(x.dtype)
    dw = weight_grad(x, dy, group_sizes, w.shape[0], bm).astype(w.dtype)
    return dx, dw, None


grouped_matmul.defvjp(_fwd, _bwd)


def _megablox():
    # The package's `gmm` attribute is the custom-VJP op; its kernels live in the module.
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _interpret() -> bool:
    return target_platform() != "tpu"


def _zero_tail(y, group_sizes):
    rows = jnp.arange(y.shape[0])[:, None]
    return jnp.where(rows < jnp.sum(group_sizes), y, jnp.zeros((), y.dtype))


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn) for an [m,k] x [k,n] grouped product: the largest of 512, 256, ... 8 that
    divides m (megablox needs tm | m), and for k and n the whole dimension up to 512, else the
    largest of 512/256/128 dividing it (Mosaic takes lane-aligned tiles or whole dimensions;
    megablox pads a ragged last k or n tile)."""

    def tile(d: int) -> int:
        return d if d <= 512 else next((t for t in (512, 256, 128) if d % t == 0), 512)

    tm = next((t for t in (512, 256, 128, 64, 32, 16, 8) if m % t == 0), m)
    return tm, tile(k), tile(n)


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
        yb = jnp.where(keep, jax.lax.dynamic_slice_in_dim(dy, at, bm), 0)
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
