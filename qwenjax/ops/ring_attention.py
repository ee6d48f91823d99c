"""Ring attention: exact attention over a sequence sharded on the `context` mesh axis.

Dimension letters: B batch, T global length, t = T / n local length (n devices on the ring),
H query heads, K kv heads, Dh head dim; a trailing `l` (Hl, Kl) marks a per-device head count.

The caller has put the tokens into a layout (`context_layout`: contiguous, zigzag, striped) and
passes the global positions and segment ids of every slot, so masks never depend on the layout:
query i sees key j iff their segment ids are equal and (if causal) pos[j] <= pos[i].

Forward, on every device r of the ring (`jax.shard_map`): the local q shard stays put while the
kv shards (k, v, their positions and segment ids) travel round the ring with `ppermute`; at step s
device r holds the kv shard of device r - s. Each step runs blockwise attention of the resident
queries against the visiting keys (`attention_with_lse`, which skips fully masked blocks) and the
partial outputs are merged by their log-sum-exp in fp32. The next shard's `ppermute` is issued
before the current step's compute so the transfer can overlap it, and a step whose visiting shard
has no visible (query, key) pair at all is skipped (`lax.cond`, exact test below).

Backward (`jax.custom_vjp`): the forward saves only the local q, k, v, output and the final global
log-sum-exp, O(t) per device. The backward rings k, v again; with the global lse,
`attention_backward` gives each step's exact share of the local dq and the visiting shard's dk, dv.
The dk/dv accumulators ride the ring one step behind their k, v (each device adds its share and
passes them on), so after n steps plus one final hop every shard's dk, dv are back home.

Memory per device stays O(t): one resident q shard, one or two kv shards, fp32 accumulators, and
one block pair of scores inside the blockwise kernel. Nothing O(T) or O(T^2) is ever built.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from qwenjax.ops.attention import attention_backward, attention_with_lse
from qwenjax.ops.context_layout import LAYOUTS, from_layout, permutation, to_layout
from qwenjax.ops.ring_splash import step_backward, step_forward, step_kernels

__all__ = ["LAYOUTS", "from_layout", "ring_attention", "ring_block_counts", "to_layout"]

F32 = jnp.float32
Axes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static configuration of one ring-attention call (hashable: a custom_vjp nondiff arg)."""

    mesh: Mesh
    axis: str
    batch_axes: Axes
    head_axes: Axes
    kv_sharded: bool  # K split over head_axes; otherwise replicated and sliced per device
    causal: bool
    scale: float
    block_q: int
    block_kv: int
    kernel: str = "xla"  # per-step kernel: ours (blockwise, by positions) or "splash"
    layout: str = "zigzag"  # the token layout, which fixes splash's per-step masks
    splash_block: int = 0
    interpret: bool = False  # splash in Pallas interpret mode (off TPU)

    def splash(self, t: int, heads: int, head_dim: int):
        """(kernels, int [n, n] class table) of the splash step masks (ops/ring_splash.py)."""
        return step_kernels(self.layout, self.n, t, heads, head_dim, self.splash_block,
                            self.interpret)

    @property
    def n(self) -> int:
        return self.mesh.shape[self.axis]

    def perm(self) -> list[tuple[int, int]]:
        return [(i, (i + 1) % self.n) for i in range(self.n)]

    def specs(self):
        """PartitionSpecs: q/out [B,T,H,Dh], k/v [B,T,K,Dh], pos/seg [B,T], lse [B,T,H]."""
        kv_heads = self.head_axes if self.kv_sharded else None
        return (
            P(self.batch_axes, self.axis, self.head_axes, None),
            P(self.batch_axes, self.axis, kv_heads, None),
            P(self.batch_axes, self.axis),
            P(self.batch_axes, self.axis, self.head_axes),
        )


def _as_tuple(axes: Axes) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str = "context",
    causal: bool = True,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    block_q: int = 512,
    block_kv: int = 512,
    scale: float | None = None,
    batch_axes: Axes = None,
    head_axes: Axes = None,
    kernel: str = "xla",
    layout: str = "zigzag",
    splash_block: int = 0,
    interpret: bool = False,
) -> jax.Array:
    """Exact attention of q [B,T,H,Dh] over k, v [B,T,K,Dh] with T sharded on `axis_name`.

    Positions and segment ids are int [B,T], given in the laid-out token order (global positions,
    or per-document positions with packed segments). Defaults: positions arange(T), segment ids
    all one; kv positions / segment ids default to the query ones. `batch_axes` shards B and
    `head_axes` shards H (and K when it divides; otherwise k, v stay replicated over them).
    Works inside or outside `jax.jit`; returns [B,T,H,Dh] in q's dtype with q's sharding.

    `kernel="splash"` runs each step with the Pallas splash kernel (ops/ring_splash.py; causal
    only, tokens in `layout`, positions rising with the index inside each segment; `interpret`
    off TPU); the default is our blockwise kernel, which masks by the positions given.
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    n = mesh.shape[axis_name]
    if T % n or k.shape[1] % n:
        raise ValueError(f"sequence lengths {T}, {k.shape[1]} not divisible by {axis_name}={n}")
    hs = math.prod(mesh.shape[a] for a in _as_tuple(head_axes))
    if H % hs:
        raise ValueError(f"{H} query heads do not split over head axes {head_axes} of size {hs}")
    Hl, G = H // hs, H // K
    kv_sharded = K % hs == 0
    if not kv_sharded and Hl % G and G % Hl:
        raise ValueError(f"{Hl} local query heads do not align with GQA groups of {G} heads")

    def ints(x, default):
        return jnp.asarray(default if x is None else x, jnp.int32)

    q_pos = ints(q_positions, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    kv_pos = ints(kv_positions, q_pos)
    q_seg = ints(q_segment_ids, jnp.ones((B, T), jnp.int32))
    kv_seg = ints(kv_segment_ids, q_seg)
    cfg = _Ring(
        mesh=mesh,
        axis=axis_name,
        batch_axes=batch_axes,
        head_axes=head_axes,
        kv_sharded=kv_sharded,
        causal=causal,
        scale=float(Dh**-0.5 if scale is None else scale),
        block_q=block_q,
        block_kv=block_kv,
        kernel=kernel,
        layout=layout,
        splash_block=splash_block,
        interpret=interpret,
    )
    if kernel == "splash" and not causal:
        raise ValueError("ring attention with the splash kernel is causal only")
    return _ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg)


# ---- per-device pieces ---------------------------------------------------------------------------


def _any_visible(q_pos, q_seg, kv_pos, kv_seg, causal: bool):
    """Exact: may any query [B,tq] see any key [B,tk]? Without building the [tq, tk] mask: sort
    each row's keys by (segment, position); the first key of a query's segment is then that
    segment's earliest key, the only one the causal test needs."""
    order = jnp.lexsort((kv_pos, kv_seg), axis=-1)
    seg_sorted = jnp.take_along_axis(kv_seg, order, axis=-1)
    pos_sorted = jnp.take_along_axis(kv_pos, order, axis=-1)
    first = jax.vmap(jnp.searchsorted)(seg_sorted, q_seg)  # [B,tq]
    first = jnp.minimum(first, kv_seg.shape[-1] - 1)
    hit = jnp.take_along_axis(seg_sorted, first, axis=-1) == q_seg
    if causal:
        hit &= jnp.take_along_axis(pos_sorted, first, axis=-1) <= q_pos
    return jnp.any(hit)


def _local_kv_heads(cfg: _Ring, Hl: int, H: int, K: int, k, v):
    """k, v [B,t,K,Dh] -> the kv heads the local Hl query heads use, and their first index.

    Query head h uses kv head h // G (G = H / K). With K replicated over the head axes, the
    local query heads r*Hl .. (r+1)*Hl-1 use ceil(Hl / G) consecutive kv heads."""
    if cfg.kv_sharded or not cfg.head_axes:
        return k, v, 0
    G = H // K
    start = jax.lax.axis_index(cfg.head_axes) * Hl // G
    size = max(Hl // G, 1)
    take = partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=size, axis=2)
    return take(k), take(v), start


def _merge(acc, part):
    """Combine two softmax-normalised partial outputs over disjoint key sets by their lse."""
    o1, lse1 = acc
    o2, lse2 = part
    m = jnp.maximum(lse1, lse2)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # both -inf: nothing visible yet, weights stay 0
    w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)
    total = w1 + w2
    safe = jnp.where(total > 0, total, 1.0)
    o = (o1 * w1[..., None] + o2.astype(F32) * w2[..., None]) / safe[..., None]
    return o, jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)


def _forward_shard(cfg: _Ring, H: int, K: int, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """One device's forward: returns its output [B,t,Hl,Dh] and fp32 lse [B,t,Hl]."""
    k, v, _ = _local_kv_heads(cfg, q.shape[2], H, K, k, v)
    splash, classes = _splash_steps(cfg, q)

    def partial_attention(kv, s):
        kb, vb, kp, ks = kv
        cls = None if splash is None else classes[s, jax.lax.axis_index(cfg.axis)]

        def compute(_):
            if splash is not None:
                return step_forward(splash, cls, q, kb, vb, q_seg, ks, cfg.scale)
            return attention_with_lse(
                q, kb, vb, q_pos=q_pos, kv_pos=kp, q_seg=q_seg, kv_seg=ks, causal=cfg.causal,
                scale=cfg.scale, block_q=cfg.block_q, block_kv=cfg.block_kv,
            )  # fmt: skip

        def skip(_):
            dtype = F32 if splash is not None else q.dtype
            return jnp.zeros(q.shape, dtype), jnp.full(q.shape[:3], -jnp.inf, F32)

        return jax.lax.cond(_visible(q_pos, q_seg, kp, ks, cfg.causal, cls), compute, skip, None)

    @jax.named_scope("ring_step")
    def step(carry, s):
        kv, acc = carry
        kv_next = jax.lax.ppermute(kv, cfg.axis, cfg.perm())  # before compute: overlaps it
        return (kv_next, _merge(acc, partial_attention(kv, s))), None

    acc = (jnp.zeros(q.shape, F32), jnp.full(q.shape[:3], -jnp.inf, F32))
    # n - 1 steps that pass kv on, then the last shard's step, which passes nothing.
    steps = jnp.arange(cfg.n - 1, dtype=jnp.int32)
    (kv, acc), _ = jax.lax.scan(step, ((k, v, kv_pos, kv_seg), acc), steps)
    with jax.named_scope("ring_step"):
        o, lse = _merge(acc, partial_attention(kv, cfg.n - 1))
    return o.astype(q.dtype), lse


def _splash_steps(cfg: _Ring, q):
    """(kernels, class table as a jnp array) with the splash kernel, else (None, None)."""
    if cfg.kernel != "splash":
        return None, None
    kernels, classes = cfg.splash(q.shape[1], q.shape[2], q.shape[3])
    return kernels, jnp.asarray(classes)


def _visible(q_pos, q_seg, kv_pos, kv_seg, causal: bool, cls):
    """Does this step have work: a visible pair by positions (and, with splash, a mask)?"""
    seen = _any_visible(q_pos, q_seg, kv_pos, kv_seg, causal)
    return seen if cls is None else seen & (cls >= 0)


def _backward_shard(cfg: _Ring, H: int, K: int, q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do):
    """One device's backward: dq of its queries, and dk, dv of its own (home) kv shard."""
    k_full, v_full = k, v
    k, v, head0 = _local_kv_heads(cfg, q.shape[2], H, K, k, v)
    bq, bk = min(cfg.block_q, q.shape[1]), min(cfg.block_kv, k.shape[1])
    splash, classes = _splash_steps(cfg, q)

    def partial_grads(kv, s):
        kb, vb, kp, ks = kv
        cls = None if splash is None else classes[s, jax.lax.axis_index(cfg.axis)]

        def compute(_):
            if splash is not None:
                return step_backward(splash, cls, q, kb, vb, q_seg, ks, o, lse, do, cfg.scale)
            grads = attention_backward(
                q, kb, vb, q_pos, kp, q_seg, ks, o, lse, do,
                causal=cfg.causal, scale=cfg.scale, bq=bq, bk=bk,
            )  # fmt: skip
            return tuple(g.astype(F32) for g in grads)

        def skip(_):
            return jnp.zeros(q.shape, F32), jnp.zeros(kb.shape, F32), jnp.zeros(vb.shape, F32)

        return jax.lax.cond(_visible(q_pos, q_seg, kp, ks, cfg.causal, cls), compute, skip, None)

    @jax.named_scope("ring_step")
    def step(carry, s, last: bool = False):
        # `dkv` holds the previous step's shard gradients; the device after us holds that shard
        # now, so both sends go out before the compute and only meet it at the sum afterwards.
        # (At step 0 this sends zeros: one spare hop, kept so the scan body is traced once.)
        kv, dq, dkv = carry
        kv_next = kv if last else jax.lax.ppermute(kv, cfg.axis, cfg.perm())
        dk_in, dv_in = jax.lax.ppermute(dkv, cfg.axis, cfg.perm())
        g_q, g_k, g_v = partial_grads(kv, s)
        return kv_next, dq + g_q, (dk_in + g_k, dv_in + g_v)

    zeros_kv = jnp.zeros(k.shape, F32)
    carry = ((k, v, kv_pos, kv_seg), jnp.zeros(q.shape, F32), (zeros_kv, zeros_kv))
    steps = jnp.arange(cfg.n - 1, dtype=jnp.int32)
    carry, _ = jax.lax.scan(lambda c, s: (step(c, s), None), carry, steps)
    _, dq, (dk, dv) = step(carry, cfg.n - 1, last=True)
    dk, dv = jax.lax.ppermute((dk, dv), cfg.axis, cfg.perm())  # the final hop home
    if not cfg.kv_sharded and cfg.head_axes:
        # k, v were replicated over the head axes: place this device's kv heads, sum the rest.
        place = partial(jax.lax.dynamic_update_slice_in_dim, start_index=head0, axis=2)
        dk = jax.lax.psum(place(jnp.zeros(k_full.shape, F32), dk), cfg.head_axes)
        dv = jax.lax.psum(place(jnp.zeros(v_full.shape, F32), dv), cfg.head_axes)
    return dq.astype(q.dtype), dk.astype(k_full.dtype), dv.astype(v_full.dtype)


# ---- global custom VJP ---------------------------------------------------------------------------
# The custom VJP wraps the two shard_maps (not the other way round), so JAX never transposes a
# shard_map: the backward is an ordinary forward computation over the same mesh. Both are jitted
# so that eager calls (and eager `jax.grad`) run compiled, not op by op; under an outer jit they
# are inlined.


@partial(jax.jit, static_argnums=7)
def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg: _Ring):
    s_q, s_kv, s_tok, s_lse = cfg.specs()
    body = partial(_forward_shard, cfg, q.shape[2], k.shape[2])
    return jax.shard_map(
        body,
        mesh=cfg.mesh,
        in_specs=(s_q, s_kv, s_kv, s_tok, s_tok, s_tok, s_tok),
        out_specs=(s_q, s_lse),
        check_vma=False,
    )(q, k, v, q_pos, kv_pos, q_seg, kv_seg)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg: _Ring):
    return _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg)[0]


def _ring_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg: _Ring):
    o, lse = _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg)
    return o, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse)


@partial(jax.jit, static_argnums=0)
def _backward(cfg: _Ring, res, do):
    q, k = res[:2]
    s_q, s_kv, s_tok, s_lse = cfg.specs()
    body = partial(_backward_shard, cfg, q.shape[2], k.shape[2])
    return jax.shard_map(
        body,
        mesh=cfg.mesh,
        in_specs=(s_q, s_kv, s_kv, s_tok, s_tok, s_tok, s_tok, s_q, s_lse, s_q),
        out_specs=(s_q, s_kv, s_kv),
        check_vma=False,
    )(*res, do)


def _ring_bwd(cfg: _Ring, res, do):
    return *_backward(cfg, res, do), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---- schedule accounting -------------------------------------------------------------------------


def ring_block_counts(
    T: int,
    n: int,
    layout: str = "zigzag",
    *,
    block_q: int = 512,
    block_kv: int | None = None,
    causal: bool = True,
) -> np.ndarray:
    """int [n steps, n devices]: the (q-block, kv-block) pairs with a visible pair of tokens that
    device r computes at ring step s (against the kv shard of device r - s), for one sequence
    with global positions 0..T-1 in `layout` and no packing. These are exactly the block pairs
    the blockwise kernel does not skip, so the table shows how evenly the ring's work is spread.
    """
    block_kv = block_q if block_kv is None else block_kv
    pos = permutation(T, n, layout).reshape(n, T // n)  # global positions of each device's slots
    q_max = np.maximum.reduceat(pos, np.arange(0, T // n, block_q), axis=1)  # [n, nq]
    kv_min = np.minimum.reduceat(pos, np.arange(0, T // n, block_kv), axis=1)  # [n, nk]
    counts = np.zeros((n, n), np.int64)
    for s in range(n):
        for r in range(n):
            src = (r - s) % n
            seen = kv_min[src][None, :] <= q_max[r][:, None]
            counts[s, r] = seen.sum() if causal else seen.size
    return counts
