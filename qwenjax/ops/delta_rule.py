"""The gated delta rule of Gated DeltaNet layers (Qwen3-Next, Qwen3.5): a token-by-token reference,
the chunked (WY / UT-transform) algorithm, and a one-token decoding step.

Dimension letters: B batch, T length, H value heads (= state heads), Hk query/key heads
(H % Hk == 0; each q/k head serves H / Hk consecutive value heads), Dk key dim, Dv value dim,
C chunk length, N = ceil(T / C) chunks. Public tensors are token-major like the rest of qwenjax:
q, k [B,T,Hk,Dk], v [B,T,H,Dv], g, beta [B,T,H]; the state is [B,H,Dk,Dv] fp32.

The equations are those of `transformers`' `torch_recurrent_gated_delta_rule` and
`torch_chunk_gated_delta_rule` (models/qwen3_next): q and k are optionally l2-normalised in fp32
(x * rsqrt(sum x^2 + 1e-6)), q is then scaled by Dk^-0.5, and per token, with g a log-decay (<= 0),

    S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t.

Everything inside runs in fp32 (gates, cumulative decays, the UT solve, the state); the output is
cast to v's dtype. Matmul precision follows `jax_default_matmul_precision` (set "highest" on TPU
for fp32 parity; CPU is exact fp32 either way).

Chunked form, per chunk: c_i = sum_{t<=i} g_t (log-decay from the chunk start) and
Gamma_ij = exp(sum_{j<t<=i} g_t) for j <= i (summed directly, not as c_i - c_j, which cancels
catastrophically in fp32 once c reaches -1e3). For all chunks at once (vectorised):
[U | W] = (I + strict_lower(diag(beta) K K^T * Gamma))^-1 [diag(beta) V | diag(beta exp(c)) K],
the UT inverse built from batched matmuls (`invert_unit_lower`); then a `lax.scan` over chunks
carries S: V' = U - W S, O = diag(exp(c)) Q S + (Q K^T * Gamma) V',
S <- exp(c_C) S + (diag(Gamma_Ci) K)^T V'. Every decay is the exp of a sum of gates <= 0, so
nothing overflows and no large-negative-number masks are needed.

Packed documents: `segment_ids` [B,T]; token t starts a new document iff t > 0 and its id differs
from token t-1's. The state is reset to zero before every document start, exactly as if each
document were run on its own (`initial_state` is the state before token 0, so it only reaches the
first document). The chunked form does this exactly with masks: in-chunk interactions are kept
only within one document, only tokens of the document that was open when the chunk began read
the carried state, and the state handed on is that of the chunk's last document.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32
L2NORM_EPS = 1e-6  # as in transformers' l2norm (matches FLA)


def l2norm(x, eps: float = L2NORM_EPS):
    """x * rsqrt(sum(x^2) + eps) over the last axis, as `transformers`' l2norm."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _qk(q, k, H: int, use_qk_l2norm: bool, head_axis: int):
    """fp32, optionally l2-normalised q, k with q scaled by Dk^-0.5, heads repeated Hk -> H."""
    q, k = q.astype(F32), k.astype(F32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * q.shape[-1] ** -0.5
    Hk = k.shape[head_axis]
    if H % Hk:
        raise ValueError(f"value heads ({H}) must be a multiple of query/key heads ({Hk})")
    if Hk != H:  # repeat_interleave, as transformers does for grouped value heads
        q, k = (jnp.repeat(x, H // Hk, axis=head_axis) for x in (q, k))
    return q, k


def _initial_state(initial_state, B, H, Dk, Dv):
    if initial_state is None:
        return jnp.zeros((B, H, Dk, Dv), F32)
    if initial_state.shape != (B, H, Dk, Dv):
        raise ValueError(
            f"initial_state has shape {initial_state.shape}, expected {(B, H, Dk, Dv)}"
        )
    return initial_state.astype(F32)


def document_starts(segment_ids):
    """[B,T] int -> bool [B,T]: True where a new document starts (never at t = 0)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = jnp.zeros((segment_ids.shape[0], 1), bool)  # also right for T = 1
    return jnp.concatenate([first, change], axis=1)


def causal_conv(x, weight, segment_ids=None):
    """Depthwise causal conv of Gated DeltaNet: x [B,T,H,Dh], weight [K,H,Dh] -> [B,T,H,Dh] in
    x's dtype (fp32 accumulation). out[t] = sum_j weight[j] x[t-(K-1)+j], where a tap that
    reaches before the sequence or into a token of another segment id counts as zero, so each
    packed document is convolved as if alone. The dense reference beside
    `delta_rule_parallel.causal_conv_sequence_parallel`; same semantics as the model's copy."""
    K, T = weight.shape[0], x.shape[1]
    if segment_ids is None:
        segment_ids = jnp.zeros(x.shape[:2], jnp.int32)
    out = x.astype(F32) * weight[K - 1].astype(F32)  # tap K-1 is the token itself
    for shift in range(1, min(K, T)):  # K is small (4): unrolled over taps, not tokens
        # token t - shift; before the sequence start x is zero-padded (its id, -1, is moot)
        x_prev = jnp.pad(x, ((0, 0), (shift, 0), (0, 0), (0, 0)))[:, :T]
        id_prev = jnp.pad(segment_ids, ((0, 0), (shift, 0)), constant_values=-1)[:, :T]
        keep = (id_prev == segment_ids)[:, :, None, None]
        out = out + jnp.where(keep, x_prev, 0).astype(F32) * weight[K - 1 - shift].astype(F32)
    return out.astype(x.dtype)


# ---- recurrent reference and decoding step ----------------------------------------------------


def _update(S, q, k, v, g, beta):
    """One token, fp32, q/k prepared. S [B,H,Dk,Dv]; q, k [B,H,Dk]; v [B,H,Dv]; g, beta [B,H]."""
    S = S * jnp.exp(g)[..., None, None]
    kv_mem = jnp.einsum("bhkv,bhk->bhv", S, k)
    delta = (v - kv_mem) * beta[..., None]
    S = S + k[..., :, None] * delta[..., None, :]
    return S, jnp.einsum("bhkv,bhk->bhv", S, q)


def delta_rule_recurrent(
    q, k, v, g, beta, *, initial_state=None, use_qk_l2norm: bool = True, segment_ids=None
):
    """Token-by-token reference (`lax.scan` over T). q, k [B,T,Hk,Dk]; v [B,T,H,Dv];
    g, beta [B,T,H]; initial_state [B,H,Dk,Dv] or None; segment_ids [B,T] int or None.

    Returns (out [B,T,H,Dv] in v's dtype, final_state [B,H,Dk,Dv] fp32).
    """
    B, T, H, Dv = v.shape
    q, k = _qk(q, k, H, use_qk_l2norm, head_axis=2)
    S0 = _initial_state(initial_state, B, H, k.shape[-1], Dv)
    starts = jnp.zeros((B, T), bool) if segment_ids is None else document_starts(segment_ids)
    xs = [jnp.moveaxis(x, 1, 0) for x in (q, k, v.astype(F32), g.astype(F32), beta.astype(F32))]

    def step(S, x):
        q_t, k_t, v_t, g_t, beta_t, start_t = x
        S = jnp.where(start_t[:, None, None, None], 0.0, S)
        return _update(S, q_t, k_t, v_t, g_t, beta_t)

    S, out = jax.lax.scan(step, S0, (*xs, starts.T))
    return jnp.moveaxis(out, 0, 1).astype(v.dtype), S


def delta_rule_step(q, k, v, g, beta, state, *, use_qk_l2norm: bool = True):
    """One decoding token. q, k [B,Hk,Dk]; v [B,H,Dv]; g, beta [B,H]; state [B,H,Dk,Dv].

    Returns (out [B,H,Dv] in v's dtype, new_state [B,H,Dk,Dv] fp32).
    """
    H = v.shape[1]
    q, k = _qk(q, k, H, use_qk_l2norm, head_axis=1)
    S, out = _update(state.astype(F32), q, k, v.astype(F32), g.astype(F32), beta.astype(F32))
    return out.astype(v.dtype), S


# ---- chunked -----------------------------------------------------------------------------------


def _chunks(x, C):
    """[B,T,H,...] (T a multiple of C) -> [B,H,N,C,...]."""
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // C, C, H, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def _segsum(g):
    """g [..., C] -> [..., C, C]: sum of g over (j, i] where j <= i, else 0. Summed directly, not
    as cum_i - cum_j, which in fp32 loses the small gates after a large one (the chunk's cumsum
    may reach -1e3 while a slow head's gates are -1e-2)."""
    C = g.shape[-1]
    x = jnp.where(
        jnp.tril(jnp.ones((C, C), bool), -1), g[..., :, None], 0.0
    )  # x[i, j] = g_i, i > j
    return jnp.cumsum(x, axis=-2)


def _masked_exp(mask, x):
    """exp(x) where mask, else 0; gradients stay finite where x is masked."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


@jax.custom_vjp
def invert_unit_lower(L):
    """Inverse of unit lower-triangular L [..., C, C], with batched matmuls only (no triangular
    solve: XLA:CPU's batched one is 5-50x slower than these matmuls). Doubles the inverted
    diagonal blocks, [[A, 0], [X, D]]^-1 = [[A^-1, 0], [-D^-1 X A^-1, D^-1]], from 1x1 blocks up
    to the next power of two >= C (padded with identity): about (2/3) C^3 FLOPs. Its VJP is
    dL = -L^-T dInv L^-T on the strictly lower triangle (the only free entries)."""
    *batch, C, _ = L.shape
    P = 1 << (C - 1).bit_length()
    if P != C:
        L = jnp.pad(L, [(0, 0)] * len(batch) + [(0, P - C)] * 2)
        L = L + jnp.diag((jnp.arange(P) >= C).astype(L.dtype))
    inv = jnp.ones((*batch, P, 1, 1), L.dtype)  # inverted diagonal blocks [..., P/s, s, s]
    s = 1
    while s < P:
        m = P // (2 * s)
        pairs = jnp.diagonal(L.reshape(*batch, m, 2 * s, m, 2 * s), axis1=-4, axis2=-2)
        x = jnp.moveaxis(pairs, -1, -3)[..., s:, :s]  # [..., m, s, s] block below the diagonal
        a_inv, d_inv = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        low = -(d_inv @ x @ a_inv)
        top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=-1)
        inv = jnp.concatenate([top, jnp.concatenate([low, d_inv], axis=-1)], axis=-2)
        s *= 2
    return inv[..., 0, :C, :C]


def _invert_fwd(L):
    inv = invert_unit_lower(L)
    return inv, inv


def _invert_bwd(inv, d_inv):
    inv_t = jnp.swapaxes(inv, -1, -2)
    return (-jnp.tril(inv_t @ d_inv @ inv_t, -1),)


invert_unit_lower.defvjp(_invert_fwd, _invert_bwd)


class ChunkTerms(NamedTuple):
    """Per-chunk tensors of the chunked form, everything that does not depend on the carried
    state S (all fp32, [B,H,N,C,...]; `chunk_scan` runs the recurrence over them). Per chunk:
    V' = u - w S, O = q_carry S + attn V', S <- chunk_decay S + k_out^T V'."""

    u: jax.Array  # [B,H,N,C,Dv]
    w: jax.Array  # [B,H,N,C,Dk]
    q_carry: jax.Array  # [B,H,N,C,Dk] q scaled by its decay from the chunk start (0: no carry)
    attn: jax.Array  # [B,H,N,C,C] in-chunk, same-document causal q.k weights
    k_out: jax.Array  # [B,H,N,C,Dk] k decayed to the chunk end (0 unless the last document)
    chunk_decay: jax.Array  # [B,H,N] decay of the carried state over the chunk (0: reset)


@jax.named_scope("chunk_terms")
def chunk_terms(
    q,
    k,
    v,
    g,
    beta,
    *,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    segment_ids=None,
) -> ChunkTerms:
    """The state-independent part of `delta_rule_chunked` (same inputs; T padded to a multiple
    of `chunk_size` with inert tokens): q/k preparation, decays, document masks, the UT solve."""
    B, T, H, Dv = v.shape
    C = chunk_size
    q, k = _qk(q, k, H, use_qk_l2norm, head_axis=2)
    pad = -T % C

    def tpad(x):  # [B,T,...] -> [B,T+pad,...] with zeros (False)
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    q, k, v, g, beta = (tpad(x.astype(F32)) for x in (q, k, v, g, beta))
    q, k, v = (_chunks(x, C) for x in (q, k, v))  # [B,H,N,C,D]
    g, beta = (_chunks(x, C) for x in (g, beta))  # [B,H,N,C]
    N = q.shape[2]

    causal = jnp.tril(jnp.ones((C, C), bool))  # [C(i), C(j)]: j <= i
    if segment_ids is None:
        same = causal  # [C,C]
        reads_carry = jnp.ones((C,), bool)  # token reads the state carried into its chunk
        same_as_last = jnp.ones((C,), bool)  # token belongs to the chunk's last document
    else:
        starts = tpad(document_starts(segment_ids))  # False: padding continues the last document
        doc = jnp.cumsum(starts.reshape(B, N, C), axis=-1)  # in-chunk document index [B,N,C]
        same = causal & (doc[..., :, None] == doc[..., None, :])  # [B,N,C,C]
        same = same[:, None]  # [B,1,N,C,C]
        reads_carry = (doc == 0)[:, None]  # [B,1,N,C]
        same_as_last = (doc == doc[..., -1:])[:, None]
    strict = same & ~jnp.eye(C, dtype=bool)

    cum = jnp.cumsum(g, axis=-1)  # [B,H,N,C] log-decay from chunk start through token i
    seg = _segsum(g)  # [B,H,N,C,C] log-decay over (j, i]
    k_beta = k * beta[..., None]
    kk = jnp.einsum("bhnik,bhnjk->bhnij", k_beta, k)
    ut = jnp.eye(C, dtype=F32) + kk * _masked_exp(strict, seg)  # unit lower triangular
    attn = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * _masked_exp(same, seg)
    carry_decay = _masked_exp(reads_carry, cum)  # [B,H,N,C]
    rhs = jnp.concatenate([v * beta[..., None], k_beta * carry_decay[..., None]], axis=-1)
    sol = jnp.einsum("bhnij,bhnjd->bhnid", invert_unit_lower(ut), rhs)
    u, w = sol[..., :Dv], sol[..., Dv:]  # [B,H,N,C,Dv], [B,H,N,C,Dk]
    q_carry = q * carry_decay[..., None]
    k_out = k * _masked_exp(same_as_last, seg[..., -1, :])[..., None]  # decay to chunk end
    chunk_decay = _masked_exp(reads_carry[..., -1], cum[..., -1])  # [B,H,N]
    return ChunkTerms(u, w, q_carry, attn, k_out, chunk_decay)


@jax.named_scope("chunk_scan")
def chunk_scan(terms: ChunkTerms, S0):
    """The recurrence over chunks (`lax.scan`) from S0 [B,H,Dk,Dv'] fp32, where Dv' is the last
    dim of `terms.u` (callers may append columns to u and S0: every column evolves alone).

    Returns (out [B,H,N,C,Dv'] fp32, final_state [B,H,Dk,Dv'] fp32).
    """

    def step(S, x):
        u, w, q_carry, attn, k_out, chunk_decay = x
        v_new = u - jnp.einsum("bhik,bhkv->bhiv", w, S)
        o = jnp.einsum("bhik,bhkv->bhiv", q_carry, S) + jnp.einsum("bhij,bhjv->bhiv", attn, v_new)
        S = S * chunk_decay[..., None, None] + jnp.einsum("bhik,bhiv->bhkv", k_out, v_new)
        return S, o

    S, out = jax.lax.scan(step, S0, [jnp.moveaxis(x, 2, 0) for x in terms])  # out [N,B,H,C,Dv']
    return jnp.moveaxis(out, 0, 2), S


def delta_rule_chunked(
    q,
    k,
    v,
    g,
    beta,
    *,
    initial_state=None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    segment_ids=None,
):
    """Chunked gated delta rule (shapes as `delta_rule_recurrent`): any T, padded internally to a
    multiple of `chunk_size` with inert tokens (k = v = beta = g = 0 leave the state unchanged).

    Returns (out [B,T,H,Dv] in v's dtype, final_state [B,H,Dk,Dv] fp32).
    """
    B, T, H, Dv = v.shape
    S0 = _initial_state(initial_state, B, H, k.shape[-1], Dv)
    terms = chunk_terms(
        q,
        k,
        v,
        g,
        beta,
        chunk_size=chunk_size,
        use_qk_l2norm=use_qk_l2norm,
        segment_ids=segment_ids,
    )
    out, S = chunk_scan(terms, S0)  # out [B,H,N,C,Dv]
    N, C = out.shape[2:4]
    out = out.transpose(0, 2, 3, 1, 4).reshape(B, N * C, H, Dv)[:, :T]
    return out.astype(v.dtype), S
