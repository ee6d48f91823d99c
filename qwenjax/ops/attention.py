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
# Internally everything is blocked along T and head-major, so batch dims (b, k) lead every dot
# product: q [nq,B,K,G,bq,Dh], k/v [nk,B,K,bk,Dh], positions / segment ids [n,B,block].


def _pad_to(x, block, axis, value):
    extra = -x.shape[axis] % block
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _token_blocks(x, block, value):
    """[B,T] -> [n,B,block] (T padded with `value` to a multiple of block)."""
    x = _pad_to(x, block, 1, value)
    return x.reshape(x.shape[0], -1, block).transpose(1, 0, 2)


def _head_blocks(x, K, block):
    """[B,T,H,*d] -> [n,B,K,G,block,*d], G = H / K (T padded with zeros).

    One reshape, then one transpose. (Transposing to head-major, then splitting T and moving
    the block index to the front is the same permutation, but with the reshape in between
    XLA:CPU permutes the data twice.)"""
    x = _pad_to(x, block, 1, 0)
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // block, block, K, H // K, *x.shape[3:])
    return x.transpose(1, 0, 3, 4, 2, *range(5, x.ndim))


def _head_unblocks(x, T):
    """Inverse of `_head_blocks`, padding dropped: [n,B,K,G,block,*d] -> [B,T,K*G,*d]."""
    n, B, K, G, block = x.shape[:5]
    x = x.transpose(1, 0, 4, 2, 3, *range(5, x.ndim))
    return x.reshape(B, n * block, K * G, *x.shape[5:])[:, :T]


def _prep(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk):
    K = k.shape[2]
    qb = _head_blocks(q, K, bq)  # [nq,B,K,G,bq,Dh]
    kb = _head_blocks(k, K, bk)[:, :, :, 0]  # [nk,B,K,bk,Dh]
    vb = _head_blocks(v, K, bk)[:, :, :, 0]
    q_pos_b = _token_blocks(q_pos, bq, 0)  # [nq,B,bq]
    q_seg_b = _token_blocks(q_seg, bq, _Q_PAD_SEGMENT)
    kv_pos_b = _token_blocks(kv_pos, bk, 0)
    kv_seg_b = _token_blocks(kv_seg, bk, _KV_PAD_SEGMENT)
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
    Tq = q.shape[1]
    qb, q_pos_b, q_seg_b, kb, vb, kv_pos_b, kv_seg_b = _prep(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk
    )
    kv_blocks = (kb, vb, kv_pos_b, kv_seg_b)

    def one(args):
        o, m, l = _forward_q_block(*args, kv_blocks, causal, scale)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        return o.astype(q.dtype), lse

    o, lse = jax.lax.map(one, (qb, q_pos_b, q_seg_b))  # [nq,B,K,G,bq,Dh], [nq,B,K,G,bq]
    return _head_unblocks(o, Tq), _head_unblocks(lse, Tq)


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
    Outer scan over key blocks, inner scan over query blocks; the probabilities of each visible
    block pair are computed once. The current key block's dk, dv (transposed, see
    `_backward_pair`) ride in the inner carry; dq is one fp32 buffer for all query blocks that
    each visible pair adds its share to in place, so no per-key-block dq is ever stacked.
    """
    B, Tq, _, Dh = q.shape
    Tk, K = k.shape[1:3]
    qb, q_pos_b, q_seg_b, kb, vb, kv_pos_b, kv_seg_b = _prep(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk
    )
    nq, nk = qb.shape[0], kb.shape[0]
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)  # [B,Tq,H]: rowsum(dO * O)
    lse_b = _head_blocks(jnp.where(jnp.isfinite(lse), lse, 0.0), K, bq)  # [nq,B,K,G,bq]
    dob = _head_blocks(do, K, bq)
    q_side = (qb, _dh_major(qb), dob, _dh_major(dob), lse_b, _head_blocks(delta, K, bq))

    def kv_step(dq_all, kv_blk):
        kblk, vblk, kp, ks = kv_blk

        def q_step(carry, i):
            mask = visible(q_pos_b[i], kp, q_seg_b[i], ks, causal)[:, None, None]

            def compute(carry):  # slices inside the branch: a skipped pair copies nothing
                dk_t, dv_t, dq_all = carry
                ddk_t, ddv_t, dq = _backward_pair(*(x[i] for x in q_side), kblk, vblk, mask, scale)
                dq_all = jax.lax.dynamic_update_index_in_dim(dq_all, dq_all[i] + dq, i, 0)
                return dk_t + ddk_t, dv_t + ddv_t, dq_all

            return _skip_or(mask, compute, carry, nq * nk), None

        zeros = jnp.zeros((B, K, Dh, bk), F32)
        (dk_t, dv_t, dq_all), _ = jax.lax.scan(q_step, (zeros, zeros, dq_all), jnp.arange(nq))
        return dq_all, (dk_t, dv_t)

    dq0 = jnp.zeros(qb.shape, F32)
    dq, (dk_t, dv_t) = jax.lax.scan(kv_step, dq0, (kb, vb, kv_pos_b, kv_seg_b))
    dq = _head_unblocks(dq * scale, Tq).astype(q.dtype)

    def kv_tokens(x_t):  # [nk,B,K,Dh,bk] -> [B,Tk,K,Dh]
        return x_t.transpose(1, 0, 4, 2, 3).reshape(B, nk * bk, K, Dh)[:, :Tk]

    return dq, kv_tokens(dk_t * scale).astype(k.dtype), kv_tokens(dv_t).astype(v.dtype)


def _dh_major(x):
    """[n,B,K,G,bq,Dh] -> [n,B,K,Dh,G,bq], made once so no block is transposed in the loop."""
    return jnp.moveaxis(x, -1, 3)


def _backward_pair(qb, qb_t, dob, dob_t, lse, delta, kb, vb, mask, scale):
    """One (query block, key block) pair: returns dk^T, dv^T [B,K,Dh,bk] (dk without `scale`)
    and dq [B,K,G,bq,Dh] (without `scale`).

    dk and dv are computed transposed, as [Dh, G*bq] x [G*bq, bk]: contracting the score-shaped
    p and ds over their leading (query) dims as they lie. Computing dk = ds^T q instead makes XLA
    transpose the [G*bq, bk] matrix in every step, which on XLA:CPU more than doubles the cost of
    the pair. The mask goes into the exponent, so p (and with it ds) is zero where not visible
    and no later pass needs the mask again.
    """
    s = jnp.where(mask, _scores(qb, kb, scale) - lse[..., None], -jnp.inf)
    p = jnp.exp(s)  # [B,K,G,bq,bk]
    dv_t = jnp.einsum("bkdgq,bkgqs->bkds", dob_t, p.astype(dob_t.dtype), preferred_element_type=F32)
    dp = jnp.einsum("bkgqd,bksd->bkgqs", dob, vb, preferred_element_type=F32)
    ds = p * (dp - delta[..., None])
    dk_t = jnp.einsum("bkdgq,bkgqs->bkds", qb_t, ds, preferred_element_type=F32)
    dq = jnp.einsum("bkgqs,bksd->bkgqd", ds, kb, preferred_element_type=F32)
    return dk_t, dv_t, dq
