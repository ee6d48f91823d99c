"""Ring attention = dense attention (forward and gradients) on 8 simulated devices, every layout,
causal or not, GQA, packed documents crossing shard boundaries, batch and head sharding; the exact
skip test; and the zigzag layout's even spread of causal work over the ring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.ops.attention import dense_attention
from qwenjax.ops.ring_attention import _any_visible, ring_attention, ring_block_counts, to_layout
from qwenjax.sharding import make_mesh


def _inputs(B, T, H, K, Dh, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, Dh))
    k = jax.random.normal(ks[1], (B, T, K, Dh))
    v = jax.random.normal(ks[2], (B, T, K, Dh))
    w = jax.random.normal(ks[3], (B, T, H, Dh))  # cotangent of the output
    return q, k, v, w


def _packed(B, T, n, layout):
    """Global order: row 0 packs four documents whose edges fall inside shards, positions
    restarting per document; other rows: 5 padding tokens (segment 0), then one document.
    Returned in `layout` order, as a caller hands them to ring attention."""
    pos = np.tile(np.arange(T), (B, 1))
    seg = np.ones((B, T), np.int32)
    cuts = [0, 7, T // 2 + 3, T // 2 + 4, T]
    for d in range(4):
        seg[0, cuts[d] : cuts[d + 1]] = d + 1
        pos[0, cuts[d] : cuts[d + 1]] = np.arange(cuts[d + 1] - cuts[d])
    seg[1:, :5] = 0
    return (jnp.asarray(to_layout(x, n, layout)) for x in (pos, seg))


def _check(mesh, layout, causal, B, T, H, K, block_q, block_kv, **axes):
    n = mesh.shape["context"]
    q, k, v, w = _inputs(B, T, H, K, 8)
    pos, seg = _packed(B, T, n, layout)

    def ring(q, k, v):
        return ring_attention(
            q, k, v, mesh=mesh, causal=causal, q_positions=pos, q_segment_ids=seg,
            block_q=block_q, block_kv=block_kv, **axes,
        )  # fmt: skip

    def dense(q, k, v):
        return dense_attention(q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, causal=causal)

    def out_and_grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w)

    out, grads = jax.jit(out_and_grads, static_argnums=0)(ring)
    ref, ref_grads = jax.jit(out_and_grads, static_argnums=0)(dense)
    assert float(jnp.abs(out - ref).max()) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert float(jnp.abs(g - r).max()) <= 5e-5


@pytest.mark.parametrize(
    "layout,causal,n,H,K,block_q,block_kv",
    [
        ("zigzag", True, 8, 4, 1, 5, 4),  # local length 6: blocks do not divide it
        ("zigzag", False, 4, 4, 2, 5, 7),
        ("contiguous", True, 4, 4, 2, 7, 5),  # later steps fully masked: skipped
        ("contiguous", False, 8, 4, 1, 4, 4),
        ("striped", True, 2, 4, 1, 10, 7),
        ("striped", False, 4, 4, 2, 12, 12),
    ],
)
def test_ring_matches_dense(layout, causal, n, H, K, block_q, block_kv):
    mesh = make_mesh({"context": n}, jax.devices()[:n])
    _check(mesh, layout, causal, 2, 48, H, K, block_q, block_kv)


@pytest.mark.parametrize(
    "shape,K,axes",
    [
        ({"data": 2, "context": 4}, 2, {"batch_axes": ("data", "fsdp", "expert")}),
        ({"tensor": 2, "context": 4}, 2, {"head_axes": "tensor"}),  # K split over tensor
        ({"tensor": 2, "context": 4}, 1, {"head_axes": "tensor"}),  # K replicated, sliced
    ],
)
def test_composes_with_batch_and_head_sharding(shape, K, axes):
    _check(make_mesh(shape), "zigzag", True, 2, 64, 4, K, 6, 5, **axes)


def test_outside_jit():
    mesh = make_mesh({"context": 2}, jax.devices()[:2])
    q, k, v, w = _inputs(1, 16, 2, 1, 8)

    def ring(q, k, v):
        return ring_attention(q, k, v, mesh=mesh, block_q=3, block_kv=3)

    pos, seg = jnp.arange(16)[None], jnp.ones((1, 16), jnp.int32)

    def dense(q, k, v):
        return dense_attention(q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg)

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2))

    # The ring runs eagerly; only the reference is jitted (op by op it takes seconds).
    assert float(jnp.abs(ring(q, k, v) - jax.jit(dense)(q, k, v)).max()) <= 1e-5
    g = grads(ring)(q, k, v)
    r = jax.jit(grads(dense))(q, k, v)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(g, r)) <= 5e-5


@pytest.mark.parametrize("causal", [True, False])
def test_step_skip_is_exact(causal):
    """`_any_visible` against the full mask, on random shards with few segments and positions
    chosen so that visibility often hinges on a single pair."""
    rng = np.random.default_rng(0)
    check = jax.jit(_any_visible, static_argnums=4)
    outcomes = set()
    for _ in range(200):
        q_pos, kv_pos = rng.integers(0, 12, (2, 1, 4))
        q_seg, kv_seg = rng.integers(0, 5, (2, 1, 4))
        mask = q_seg[:, :, None] == kv_seg[:, None, :]
        if causal:
            mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
        got = bool(check(q_pos, q_seg, kv_pos, kv_seg, causal))
        assert got == bool(mask.any())
        outcomes.add(got)
    assert outcomes == {True, False}


@pytest.mark.parametrize("n", [4, 8])
def test_zigzag_balances_causal_work(n):
    T, block = 64 * n, 8  # block divides the zigzag chunk T / 2n = 32
    zigzag = ring_block_counts(T, n, "zigzag", block_q=block)
    contiguous = ring_block_counts(T, n, "contiguous", block_q=block)
    # Zigzag: every device computes the same number of block pairs at every ring step ...
    assert np.all(zigzag == zigzag[:, :1]) and zigzag.min() > 0
    # ... the same total as contiguous, which idles devices (0 pairs) while others work.
    assert zigzag.sum() == contiguous.sum()
    assert np.any(contiguous != contiguous[:, :1]) and contiguous.min() == 0
    # The table counts block pairs with a visible token pair, read off a dense causal mask.
    pos = to_layout(np.arange(T), n, "zigzag", axis=0).reshape(n, T // n)
    for s, r in [(0, 0), (1, 0), (n - 1, n // 2)]:
        mask = pos[(r - s) % n][None, :] <= pos[r][:, None]  # [t, t]
        blocks = mask.reshape(T // n // block, block, T // n // block, block).any(axis=(1, 3))
        assert zigzag[s, r] == blocks.sum()
    assert np.all(
        ring_block_counts(T, n, "striped", block_q=block, causal=False) == (T // n // block) ** 2
    )
