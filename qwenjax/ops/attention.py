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
    ints = lambda x: x.astype(jnp.int32)  # noqa: E731
    return _flash(q, k, v, ints(q_pos), ints(kv_pos), ints(q_seg), ints(kv_seg), causal, scale, bq, bk)


# ---- blocking helpers -------------------------------------------------------------------------


def _pad_to(x, block, axis, value):
    extra = -x.shape[axis] % block
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x, block):
    """[B, T, ...] -> [n, B, block, ...] (T already a multiple of block)."""
    B, T = x.shape[:2]
    x = x.reshape(B, T // block, block, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unblocks(x):
    """[n, B, block, ...] -> [B, n*block, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _prep(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
    B, Tq, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    qb = _blocks(_pad_to(q, bq, 1, 0).reshape(B, -1, K, G, Dh), bq)  # [nq,B,bq,K,G,Dh]
    q_pos_b = _blocks(_pad_to(q_pos, bq, 1, 0), bq)
    q_seg_b = _blocks(_pad_to(q_seg, bq, 1, _Q_PAD_SEGMENT), bq)
    kb = _blocks(_pad_to(k, bk, 1, 0), bk)  # [nk,B,bk,K,Dh]
    vb = _blocks(_pad_to(v, bk, 1, 0), bk)
    kv_pos_b = _blocks(_pad_to(kv_pos, bk, 1, 0), bk)
    kv_seg_b = _blocks(_pad_to(kv_seg, bk, 1, _KV_PAD_SEGMENT), bk)
    return qb, q_pos_b, q_seg_b, kb, vb, kv_pos_b, kv_seg_b


def _scores(qb, kb, scale):
    """[B,bq,K,G,Dh] x [B,bk,K,Dh] -> fp32 [B,K,G,bq,bk]."""
    return jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=F32) * scale


# ---- forward ----------------------------------------------------------------------------------


def _forward_q_block(qb, q_pos, q_seg, kv_blocks, causal, scale):
    """One query block against all key blocks: online softmax. Returns acc/l, m, l (fp32)."""
    B, bq, K, G, Dh = qb.shape
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
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb, preferred_element_type=F32)
            return m_new, l, acc * alpha[..., None] + pv

        return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry), None

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
        return o, lse

    o, lse = jax.lax.map(one, (qb, q_pos_b, q_seg_b))  # [nq,B,K,G,bq,Dh], [nq,B,K,G,bq]
    o = jnp.moveaxis(o, 4, 2)  # [nq,B,bq,K,G,Dh]
    o = _unblocks(o)[:, :Tq].reshape(B, Tq, H, Dh).astype(q.dtype)
    lse = _unblocks(jnp.moveaxis(lse, 4, 2))[:, :Tq].reshape(B, Tq, H)
    return o, lse


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
    """Gradients of blockwise attention given the output and its log-sum-exp.

    `lse` may be the log-sum-exp over a larger key set than `k`/`v` (ring attention passes the
    global one); the result is then this key set's share of dq and its exact dk/dv.
    """
    B, Tq, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    qb, q_pos_b, q_seg_b, kb, vb, kv_pos_b, kv_seg_b = _prep(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk
    )
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)  # [B,Tq,H]

    def per_head_blocks(x):  # [B,Tq,H] -> [nq,B,K,G,bq]
        x = _blocks(_pad_to(x.reshape(B, Tq, K, G), bq, 1, 0), bq)
        return jnp.moveaxis(x, 2, 4)

    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    lse_b, delta_b = per_head_blocks(lse_safe), per_head_blocks(delta)
    dob = _blocks(_pad_to(do, bq, 1, 0).reshape(B, -1, K, G, Dh), bq)

    def probs(qblk, kblk, lse_blk, mask):
        return jnp.where(mask, jnp.exp(_scores(qblk, kblk, scale) - lse_blk[..., None]), 0.0)

    def dq_block(args):
        qblk, dob_blk, lse_blk, delta_blk, qp, qs = args

        def step(dq, blk):
            kblk, vblk, kp, ks = blk
            mask = visible(qp, kp, qs, ks, causal)[:, None, None]

            def compute(dq):
                p = probs(qblk, kblk, lse_blk, mask)
                dp = jnp.einsum("bqkgd,bskd->bkgqs", dob_blk, vblk, preferred_element_type=F32)
                ds = p * (dp - delta_blk[..., None])
                return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kblk, preferred_element_type=F32)

            return jax.lax.cond(jnp.any(mask), compute, lambda d: d, dq), None

        dq, _ = jax.lax.scan(step, jnp.zeros(qblk.shape, F32), (kb, vb, kv_pos_b, kv_seg_b))
        return dq * scale

    def dkv_block(args):
        kblk, vblk, kp, ks = args

        def step(carry, blk):
            qblk, dob_blk, lse_blk, delta_blk, qp, qs = blk
            mask = visible(qp, kp, qs, ks, causal)[:, None, None]

            def compute(carry):
                dk, dv = carry
                p = probs(qblk, kblk, lse_blk, mask)
                dv = dv + jnp.einsum(
                    "bkgqs,bqkgd->bskd", p.astype(dob_blk.dtype), dob_blk, preferred_element_type=F32
                )
                dp = jnp.einsum("bqkgd,bskd->bkgqs", dob_blk, vblk, preferred_element_type=F32)
                ds = p * (dp - delta_blk[..., None])
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qblk, preferred_element_type=F32)
                return dk, dv

            return jax.lax.cond(jnp.any(mask), compute, lambda c: c, carry), None

        zeros = jnp.zeros(kblk.shape, F32)
        (dk, dv), _ = jax.lax.scan(
            step, (zeros, zeros), (qb, dob, lse_b, delta_b, q_pos_b, q_seg_b)
        )
        return dk * scale, dv

    dq = jax.lax.map(dq_block, (qb, dob, lse_b, delta_b, q_pos_b, q_seg_b))
    dk, dv = jax.lax.map(dkv_block, (kb, vb, kv_pos_b, kv_seg_b))
    Tk = k.shape[1]
    dq = _unblocks(dq)[:, :Tq].reshape(B, Tq, H, Dh).astype(q.dtype)
    dk = _unblocks(dk)[:, :Tk].astype(k.dtype)
    dv = _unblocks(dv)[:, :Tk].astype(v.dtype)
    return dq, dk, dv
