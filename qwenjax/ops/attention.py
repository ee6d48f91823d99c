"""Blockwise (flash-style) attention on one device, and the dense reference it is tested against.

Dimension letters: B batch, Tq/Tk query/key length, H query heads, K kv heads, G = H / K query
heads per kv head, Dh head dim, bq/bk block sizes, nq/nk block counts.

Masks come from positions and segment ids only: query i may see key j iff their segment ids are
equal and (if causal) pos[j] <= pos[i]. Within one document, per-document positions order tokens
exactly as global indices do, so this one rule covers plain causal LM, packed documents and
padding (padding gets a segment id no real token has) and any token layout a ring may use.

Never materialises a Tq x Tk matrix: queries are processed one block at a time (`lax.map`), keys
are scanned block by block with an online softmax in fp32; blocks with no visible pair are skipped
(`lax.cond`). The backward pass is a custom VJP that recomputes probabilities blockwise from the
saved log-sum-exp (flash-attention 2), so memory stays O(T) plus one block of scores.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

F32 = jnp.float32
# Segment ids of padding rows added to fill the last block; no real token has a negative id.
_Q_PAD_SEGMENT, _KV_PAD_SEGMENT = -2, -1


def visible(q_pos, kv_pos, q_seg, kv_seg, causal: bool):
    """[B, bq] x [B, bk] -> bool [B, bq, bk]: which keys each query may attend to."""
    mask = q_seg[:, :, None] == kv_seg[:, None, :]
    if causal:
        mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
    return mask


def dense_attention(q, k, v, *, q_pos, kv_pos, q_seg, kv_seg, causal=True, scale=None):
    """Reference: full score matrix, fp32 softmax. q [B,Tq,H,Dh], k/v [B,Tk,K,Dh] -> [B,Tq,H,Dh]."""
    B, Tq, H, Dh = q.shape
    K = k.shape[2]
    scale = Dh**-0.5 if scale is None else scale
    qg = q.reshape(B, Tq, K, H // K, Dh)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=F32) * scale
    mask = visible(q_pos, kv_pos, q_seg, kv_seg, causal)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
    o = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=F32)
    return o.reshape(B, Tq, H, Dh).astype(q.dtype)


def attention(
    q, k, v, *, q_pos, kv_pos, q_seg, kv_seg, causal=True, scale=None, block_q=512, block_kv=512
):
    """Blockwise attention. q [B,Tq,H,Dh], k/v [B,Tk,K,Dh], pos/seg int [B,T] -> [B,Tq,H,Dh]."""
    out, _ = attention_with_lse(
        q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg, causal=causal,
        scale=scale, block_q=block_q, block_kv=block_kv,
    )
    return out


def attention_with_lse(
    q, k, v, *, q_pos, kv_pos, q_seg, kv_seg, causal=True, scale=None, block_q=512, block_kv=512
):
    """As `attention`, also returning the fp32 log-sum-exp [B,Tq,H] (-inf where nothing is
    visible) so partial results over disjoint key sets can be merged (ring attention)."""
    Dh = q.shape[-1]
    scale = float(Dh**-0.5 if scale is None else scale)
    bq = min(block_q, q.shape[1])
    bk = min(block_kv, k.shape[1])
    ints = lambda x: x.astype(jnp.int32)
    return _flash(q, k, v, ints(q_pos), ints(kv_pos), ints(q_seg), ints(kv_seg), causal, scale, bq, bk)


# ---- layout ---------------------------------------------------------------------------------
# Internally everything is head-major, so batch dims (b, k) lead every dot product:
#   q [B,K,G,T,Dh], k/v [B,K,T,Dh]; blocked along T: q [nq,B,K,G,bq,Dh], k/v [nk,B,K,bk,Dh].


def _pad_to(x, block, axis, value):
    extra = -x.shape[axis] % block
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x, block, axis):
    """Split `axis` (a multiple of block) into [n, ..., block, ...] with n leading."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x, axis):
    """Inverse of `_blocks`: [n, ..., block, ...] -> [..., n*block, ...] at `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _q_heads(q, K):
    """[B,T,H,Dh] -> [B,K,G,T,Dh]."""
    B, T, H, Dh = q.shape
    return q.reshape(B, T, K, H // K, Dh).transpose(0, 2, 3, 1, 4)


def _q_tokens(x):
    """[B,K,G,T,Dh] -> [B,T,H,Dh]."""
    B, K, G, T, Dh = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, Dh)


def _prep(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
    K = k.shape[2]
    qb = _blocks(_pad_to(_q_heads(q, K), bq, 3, 0), bq, 3)  # [nq,B,K,G,bq,Dh]
    kb = _blocks(_pad_to(k.transpose(0, 2, 1, 3), bk, 2, 0), bk, 2)  # [nk,B,K,bk,Dh]
    vb = _blocks(_pad_to(v.transpose(0, 2, 1, 3), bk, 2, 0), bk, 2)
    q_pos_b = _blocks(_pad_to(q_pos, bq, 1, 0), bq, 1)  # [nq,B,bq]
    q_seg_b = _blocks(_pad_to(q_seg, bq, 1, _Q_PAD_SEGMENT), bq, 1)
    kv_pos_b = _blocks(_pad_to(kv_pos, bk, 1, 0), bk, 1)
    kv_seg_b = _blocks(_pad_to(kv_seg, bk, 1, _KV_PAD_SEGMENT), bk, 1)
    return qb, q_pos_b, q_seg_b, kb, vb, kv_pos_b, kv_seg_b


def _scores(qb, kb, scale):
    """[B,K,G,bq,Dh] x [B,K,bk,Dh] -> fp32 [B,K,G,bq,bk]."""
    return jnp.einsum("bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=F32) * scale


def _skip_or(mask, compute, carry, n_blocks):
    """Run `compute(carry)` unless no pair in `mask` is visible (skip only if there are blocks
    to skip: with one block the branch costs more than it saves)."""
    if n_blocks == 1:
        return compute(carry)
    return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry)


# ---- forward ----------------------------------------------------------------------------------


def _forward_q_block(qb, q_pos, q_seg, kv_blocks, causal, scale):
    """One query block against all key blocks: online softmax. Returns o (fp32), m, l."""
    B, K, G, bq, Dh = qb.shape
    nk = kv_blocks[0].shape[0]
    init = (
        jnp.full((B, K, G, bq), -jnp.inf, F32),
        jnp.zeros((B, K, G, bq), F32),
        jnp.zeros((B, K, G, bq, Dh), F32),
    )

    def step(carry, blk):
        kb, vb, kv_pos, kv_seg = blk
        mask = visible(q_pos, kv_pos, q_seg, kv_seg, causal)[:, None, None]  # [B,1,1,bq,bk]

        def compute(carry):
            m, l, acc = carry
            s = jnp.where(mask, _scores(qb, kb, scale), -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = l * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb, preferred_element_type=F32)
            return m_new, l, acc * alpha[..., None] + pv

        return _skip_or(mask, compute, carry, nk), None

    (m, l, acc), _ = jax.lax.scan(step, init, kv_blocks)
    return acc / jnp.where(l == 0, 1.0, l)[..., None], m, l


def _flash_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, scale, bq, bk):
    B, Tq, H, Dh = q.shape
    qb, q_pos_b, q_seg_b, kb, vb, kv_pos_b, kv_seg_b = _prep(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk
    )
    kv_blocks = (kb, vb, kv_pos_b, kv_seg_b)

    def one(args):
        o, m, l = _forward_q_block(*args, kv_blocks, causal, scale)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        return o.astype(q.dtype), lse

    o, lse = jax.lax.map(one, (qb, q_pos_b, q_seg_b))  # [nq,B,K,G,bq,Dh], [nq,B,K,G,bq]
    o = _q_tokens(_unblocks(o, 3)[:, :, :, :Tq])
    lse = _unblocks(lse, 3)[..., :Tq]  # [B,K,G,Tq]
    return o, lse.transpose(0, 3, 1, 2).reshape(B, Tq, H)


# ---- custom VJP -------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, scale, bq, bk):
    return _flash_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, scale, bq, bk)


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, scale, bq, bk):
    o, lse = _flash_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, scale, bq, bk)
    return (o, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _flash_bwd(causal, scale, bq, bk, res, cotangents):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
    do, _ = cotangents  # the lse output is for merging partial results; it carries no gradient
    dq, dk, dv = attention_backward(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do, causal=causal, scale=scale, bq=bq, bk=bk
    )
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do, *, causal, scale, bq, bk):
    """Gradients of blockwise attention given the output and its log-sum-exp (one pass).

    `lse` may be the log-sum-exp over a larger key set than `k`/`v` (ring attention passes the
    global one); the result is then this key set's share of dq and its exact dk/dv.
    Outer scan over key blocks (dq accumulated across it), inner scan over query blocks; the
    probabilities of each visible block pair are computed once.
    """
    B, Tq, H, Dh = q.shape
    K = k.shape[2]
    Tk = k.shape[1]
    qb, q_pos_b, q_seg_b, kb, vb, kv_pos_b, kv_seg_b = _prep(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk
    )
    nq, nk = qb.shape[0], kb.shape[0]
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)  # [B,Tq,H]

    def per_head_blocks(x):  # [B,Tq,H] -> [nq,B,K,G,bq]
        x = x.reshape(B, Tq, K, H // K).transpose(0, 2, 3, 1)
        return _blocks(_pad_to(x, bq, 3, 0), bq, 3)

    lse_b = per_head_blocks(jnp.where(jnp.isfinite(lse), lse, 0.0))
    delta_b = per_head_blocks(delta)
    dob = _blocks(_pad_to(_q_heads(do, K), bq, 3, 0), bq, 3)
    q_side = (qb, dob, lse_b, delta_b, q_pos_b, q_seg_b)

    def kv_step(dq_all, kv_blk):
        kblk, vblk, kp, ks = kv_blk

        def q_step(carry, q_blk):
            qblk, dob_blk, lse_blk, delta_blk, qp, qs = q_blk
            mask = visible(qp, kp, qs, ks, causal)[:, None, None]

            def compute(carry):
                dk, dv, _ = carry
                p = jnp.where(mask, jnp.exp(_scores(qblk, kblk, scale) - lse_blk[..., None]), 0.0)
                dv = dv + jnp.einsum(
                    "bkgqs,bkgqd->bksd", p.astype(dob_blk.dtype), dob_blk, preferred_element_type=F32
                )
                dp = jnp.einsum("bkgqd,bksd->bkgqs", dob_blk, vblk, preferred_element_type=F32)
                ds = p * (dp - delta_blk[..., None])
                dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, qblk, preferred_element_type=F32)
                dq = jnp.einsum("bkgqs,bksd->bkgqd", ds, kblk, preferred_element_type=F32)
                return dk, dv, dq

            zero_dq = jnp.zeros(qblk.shape, F32)
            dk, dv, dq = _skip_or(mask, compute, (*carry, zero_dq), nq * nk)
            return (dk, dv), dq

        zeros = jnp.zeros(kblk.shape, F32)
        (dk, dv), dq = jax.lax.scan(q_step, (zeros, zeros), q_side)
        return dq_all + dq, (dk * scale, dv)

    dq0 = jnp.zeros(qb.shape, F32)
    dq, (dk, dv) = jax.lax.scan(kv_step, dq0, (kb, vb, kv_pos_b, kv_seg_b))
    dq = _q_tokens(_unblocks(dq * scale, 3)[:, :, :, :Tq]).astype(q.dtype)
    dk = _unblocks(dk, 2)[:, :, :Tk].transpose(0, 2, 1, 3).astype(k.dtype)
    dv = _unblocks(dv, 2)[:, :, :Tk].transpose(0, 2, 1, 3).astype(v.dtype)
    return dq, dk, dv
