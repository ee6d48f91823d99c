"""Causal attention through splash attention, the Pallas TPU kernel shipped with JAX
(`jax.experimental.pallas.ops.tpu.splash_attention`), as MaxText and levanter run it.

The kernel takes one sequence: q [H,T,Dh], k/v [K,T,Dh] with K dividing H (GQA: each kv head
serves its H/K query heads, nothing repeated), a static causal mask by index, and segment ids for
packed documents; it does not scale q. Our attention masks by positions; on the paths that call
this (one device or a mesh without `context`, tokens in sequence order) positions increase with
the index inside every segment, so index-causal plus segment ids is the same mask.

A Mosaic kernel cannot be partitioned by GSPMD, so under a mesh it runs inside a shard_map over
the batch axes (and the head axes when the kv heads split like the query heads), each device on
its own rows (`kernel_sharding.per_device`). Off TPU it runs in interpret mode (tests). Block sizes: the largest of 512 / 256 /
128 dividing T (256 at most for Dh 256, whose blocks take twice the VMEM), or `block` if given.

Dimension letters: B batch, T length, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from qwenjax.ops.kernel_sharding import per_device


def supported(T: int, head_dim: int, block: int = 0) -> str | None:
    """None if splash can run this shape, else why not (one line)."""
    if head_dim % 128:
        return f"head_dim {head_dim} is not a multiple of 128 (TPU lanes)"
    if pick_block(T, head_dim, block) is None:
        return f"sequence length {T} is not a multiple of 128"
    return None


def pick_block(T: int, head_dim: int, block: int = 0) -> int | None:
    if block:
        return block if T % block == 0 else None
    for b in (512, 256, 128):
        if T % b == 0 and not (head_dim > 128 and b > 256):
            return b
    return None


def block_sizes(block: int) -> sk.BlockSizes:
    """One square block for the forward, dq and dkv passes."""
    return sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                         block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                         block_q_dq=block, block_kv_dq=block)


def _kernel(T: int, H: int, block: int, interpret: bool):
    """The splash kernel of one causal [T, T] mask over H heads. Built in the trace that uses
    it: its block tables are that trace's constants (a kernel kept across traces leaks them;
    built eagerly they would land on the host's default device, not the mesh's). The NumPy
    mask processing behind them is cached by splash."""
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(H)])
    return sk.make_splash_mha(mask, block_sizes=block_sizes(block), head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def splash_causal_attention(q, k, v, segment_ids, *, block: int = 0, interpret: bool = False):
    """q [B,T,H,Dh], k/v [B,T,K,Dh], segment_ids [B,T] -> [B,T,H,Dh] in q's dtype."""
    T, Dh = q.shape[1], q.shape[3]
    size = pick_block(T, Dh, block)
    if size is None:
        raise ValueError(f"splash attention: {supported(T, Dh, block)}")

    def local(q, k, v, seg):
        kernel = _kernel(q.shape[1], q.shape[2], size, interpret)
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [b,T,h,Dh] -> [b,h,T,Dh]
        qh = heads_first(q * jnp.asarray(Dh**-0.5, q.dtype))
        one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, sk.SegmentIds(q=s1, kv=s1))
        o = jax.vmap(one)(qh, heads_first(k), heads_first(v), seg)
        return jnp.swapaxes(o, 1, 2).astype(q.dtype)

    return per_device(local, q, k, v, segment_ids)
