"""Splash attention as ring attention's per-step kernel (issue 14, item 3).

At ring step s, device r attends its resident queries over the kv shard of device r - s. Which
(query, key) slots may see each other by index is fixed by the token layout, so each step is one
of a few static masks (`step_masks`): with `contiguous` the visiting shard is wholly before
(all visible), the same (causal) or wholly after (nothing); with `zigzag` (two chunks per
device, r and 2n-1-r) it is the diagonal [[causal, -], [all, causal]], the left half
[[all, -], [all, -]] or the bottom half [[-, -], [all, all]]; with `striped` it is causal with
the diagonal (src <= r) or without it (src > r). Each mask is a splash kernel built once (its
block tables are NumPy work at trace time); a `lax.switch` on the step's class picks it.
Packed documents are splash's segment ids; as everywhere splash runs, positions must rise with
the global index inside each segment, so index order plus segment ids is the position mask.

Forward: the kernel's residual log-sum-exp ([H, t], natural log of the scaled scores, like ours)
feeds the ring's merge. Rows a step's mask leaves empty come out of splash as 0/0 with lse -inf
(or, when only segment ids hide them, mean(v) with lse about -2.4e38): they get weight 0 in the
merge, and NaN outputs are zeroed first. Backward: splash's own dq and dkv Pallas passes, fed the
*global* output and log-sum-exp instead of the step's, give exactly the step's share of dq and
of the visiting shard's dk, dv, which is what the ring's backward accumulates. That entry point
(`_splash_attention_bwd`) is private to JAX's splash module: it is pinned with jax (0.10.2) and
tests/test_ring_splash.py checks it against dense attention.

Dimension letters: B batch, t local length, Hl local query heads, Kl local kv heads, Dh head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from qwenjax.ops.context_layout import pieces
from qwenjax.ops.splash import block_sizes, pick_block

F32 = jnp.float32
NONE, CAUSAL, ALL = 0, 1, 2


class ChunkMask(sm._ComputableMask):
    """[t, t] mask of q and kv slots made of `len(rel)` equal chunks of consecutive tokens:
    rel[a][b] is how q chunk a sees kv chunk b (ALL, CAUSAL by offset in the chunk, or NONE).
    Computable in the kernel (compares and ands only), so no [t, t] array is stored."""

    def __init__(self, t: int, rel: tuple[tuple[int, ...], ...]):
        self.rel, c = rel, len(rel)
        size = t // c

        def mask_function(q_ids, kv_ids):
            out = (q_ids < 0) & (kv_ids < 0)  # all False, broadcast to the block
            for a in range(c):
                for b in range(c):
                    if rel[a][b] == NONE:
                        continue
                    sel = ((q_ids >= a * size) & (q_ids < (a + 1) * size)
                           & (kv_ids >= b * size) & (kv_ids < (b + 1) * size))
                    if rel[a][b] == CAUSAL:
                        sel = sel & (q_ids - a * size >= kv_ids - b * size)
                    out = out | sel
            return out

        super().__init__((t, t), mask_function)

    def __eq__(self, other):
        return isinstance(other, ChunkMask) and (self.shape, self.rel) == (other.shape, other.rel)

    def __hash__(self):
        return hash((type(self), self.shape, self.rel))


@functools.lru_cache(maxsize=16)
def step_masks(layout: str, n: int, t: int):
    """(masks, classes): the distinct splash masks of the ring's steps and an int [n, n] table,
    classes[s, r] = index into masks of device r's step s (-1: nothing visible by index)."""
    if layout == "striped":  # q slot i holds r + n i, kv slot j holds src + n j
        masks = [sm.CausalMask((t, t), offset=0), sm.CausalMask((t, t), offset=-1)]
        table = [[0 if (r - s) % n <= r else 1 for r in range(n)] for s in range(n)]
        return masks, np.asarray(table, np.int32)
    chunks = [[start for start, _ in dev] for dev in pieces(t * n, n, layout)]
    masks, classes = [], np.full((n, n), -1, np.int32)
    for s in range(n):
        for r in range(n):
            src = (r - s) % n
            rel = tuple(tuple(ALL if a > b else CAUSAL if a == b else NONE for b in chunks[src])
                        for a in chunks[r])
            if not any(any(row) for row in rel):
                continue
            mask = ChunkMask(t, rel)
            if mask not in masks:
                masks.append(mask)
            classes[s, r] = masks.index(mask)
    return masks, classes


def step_kernels(layout: str, n: int, t: int, heads: int, head_dim: int, block: int,
                 interpret: bool):
    """(kernels, classes): one splash kernel (residuals saved) per distinct step mask. Built in
    the trace that uses them (their block tables become that trace's constants; the NumPy
    mask processing behind them is cached by splash), never kept across traces."""
    masks, classes = step_masks(layout, n, t)
    size = pick_block(t, head_dim, block)
    kernels = tuple(sk.make_splash_mha(
        sm.MultiHeadMask([m] * heads), block_sizes=block_sizes(size), head_shards=1,
        q_seq_shards=1, save_residuals=True, interpret=interpret) for m in masks)
    return kernels, classes


def _heads_first(x):
    return jnp.swapaxes(x, 1, 2)  # [B,t,h,Dh] <-> [B,h,t,Dh]


def step_forward(kernels, cls, q, k, v, q_seg, kv_seg, scale: float):
    """One ring step: q [B,t,Hl,Dh] over the visiting k, v [B,t,Kl,Dh] with the mask of class
    `cls` (traced) -> (o [B,t,Hl,Dh] fp32, lse [B,t,Hl] fp32), empty rows (0, -inf)."""

    def run(kernel, ops):
        qh, kh, vh, qs, ks = ops
        o, (lse,) = jax.vmap(
            lambda a, b, c, d, e: kernel(a, b, c, segment_ids=sk.SegmentIds(q=d, kv=e))
        )(qh, kh, vh, qs, ks)
        return o.astype(F32), lse.astype(F32)

    ops = (_heads_first(q * jnp.asarray(scale, q.dtype)), _heads_first(k), _heads_first(v),
           q_seg, kv_seg)
    o, lse = jax.lax.switch(cls, [functools.partial(run, kern) for kern in kernels], ops)
    seen = jnp.isfinite(lse)
    o = jnp.where(seen[..., None], o, 0.0)
    return _heads_first(o), jnp.swapaxes(lse, 1, 2)


def step_backward(kernels, cls, q, k, v, q_seg, kv_seg, o, lse, do, scale: float):
    """The step's share of dq [B,t,Hl,Dh] and of the visiting shard's dk, dv [B,t,Kl,Dh] (fp32),
    from the global output o and log-sum-exp lse [B,t,Hl]."""

    def run(kernel, ops):
        qh, kh, vh, qs, ks, oh, lh, doh = ops
        kw = kernel.kwargs

        def one(a, b, c, d, e, f, g, h):
            res = (a, b, c, sk.SegmentIds(q=d, kv=e), None, f, g, kernel.dq_mask_info,
                   kernel.dkv_mask_info)
            grads = sk._splash_attention_bwd(
                False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None,
                kw["mask_function"], kw["attn_logits_soft_cap"], kw["interpret"], res, h)
            return grads[3:6]

        return tuple(g.astype(F32) for g in jax.vmap(one)(qh, kh, vh, qs, ks, oh, lh, doh))

    ops = (_heads_first(q * jnp.asarray(scale, q.dtype)), _heads_first(k), _heads_first(v),
           q_seg, kv_seg, _heads_first(o), jnp.swapaxes(lse, 1, 2), _heads_first(do))
    dq, dk, dv = jax.lax.switch(cls, [functools.partial(run, kern) for kern in kernels], ops)
    return _heads_first(dq) * scale, _heads_first(dk), _heads_first(dv)
