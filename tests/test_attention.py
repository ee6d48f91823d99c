"""Blockwise attention = dense reference, forward and gradients, incl. segment ids and padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.ops.attention import attention, attention_with_lse, dense_attention


def _inputs(B, T, H, K, Dh, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, Dh))
    k = jax.random.normal(ks[1], (B, T, K, Dh))
    v = jax.random.normal(ks[2], (B, T, K, Dh))
    w = jax.random.normal(ks[3], (B, T, H, Dh))  # cotangent weights for a scalar loss
    return q, k, v, w


def _packed_layout(B, T):
    """Row 0: three packed documents with restarting positions; row 1: 11 left-padding tokens."""
    pos = np.tile(np.arange(T), (B, 1))
    seg = np.ones((B, T), np.int32)
    cuts = [0, T // 3, T // 3 + 7, T]
    for d in range(3):
        seg[0, cuts[d]:cuts[d + 1]] = d + 1
        pos[0, cuts[d]:cuts[d + 1]] = np.arange(cuts[d + 1] - cuts[d])
    seg[1, :11] = 0
    return jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("T,block", [(70, 16), (64, 64), (33, 512)])
def test_blockwise_matches_dense(causal, H, K, T, block):
    q, k, v, w = _inputs(2, T, H, K, 16)
    pos, seg = _packed_layout(2, T)
    kw = {"q_pos": pos, "kv_pos": pos, "q_seg": seg, "kv_seg": seg, "causal": causal}

    def blockwise(q, k, v):
        return attention(q, k, v, block_q=block, block_kv=block // 2 + 3, **kw)

    def dense(q, k, v):
        return dense_attention(q, k, v, **kw)

    assert float(jnp.abs(blockwise(q, k, v) - dense(q, k, v)).max()) <= 1e-5
    g1 = jax.grad(lambda *a: jnp.sum(blockwise(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(lambda *a: jnp.sum(dense(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        assert float(jnp.abs(a - b).max()) <= 5e-5


def test_lse_is_log_partition_and_empty_rows_are_zero():
    q, k, v, _ = _inputs(1, 20, 2, 1, 8)
    pos = jnp.arange(20)[None]
    seg = jnp.ones((1, 20), jnp.int32)
    kv_seg = seg.at[0, :].set(2).at[0, 15:].set(1)  # queries 0..14 see nothing
    out, lse = attention_with_lse(
        q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=kv_seg, causal=True, block_q=8, block_kv=8
    )
    s = jnp.einsum("bqhd,bkd->bhqk", q, k[:, :, 0]) * 8**-0.5
    mask = (kv_seg[0][None, :] == 1) & (pos[0][None, :] <= pos[0][:, None])
    ref = jax.nn.logsumexp(jnp.where(mask, s[0], -jnp.inf), axis=-1).T  # [T,H]
    assert np.all(np.isneginf(np.asarray(lse[0, :15])))
    assert float(jnp.abs(lse[0, 15:] - ref[15:]).max()) <= 1e-5
    assert float(jnp.abs(out[0, :15]).max()) == 0.0


def test_bf16_inputs_keep_fp32_softmax():
    q, k, v, _ = _inputs(1, 96, 4, 2, 32)
    pos = jnp.arange(96)[None]
    seg = jnp.ones((1, 96), jnp.int32)
    kw = {"q_pos": pos, "kv_pos": pos, "q_seg": seg, "kv_seg": seg}
    ref = dense_attention(q, k, v, **kw)
    bf = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), block_q=32, block_kv=32, **kw)
    assert bf.dtype == jnp.bfloat16
    assert float(jnp.abs(bf.astype(jnp.float32) - ref).max()) <= 3e-2
