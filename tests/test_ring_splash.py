"""Ring attention with splash as the per-step kernel (ops/ring_splash.py), in Pallas interpret
mode on 4 simulated devices, against dense attention: every layout, packed documents crossing
shard edges, GQA, batch sharding; forward <= 1e-5 and gradients <= 5e-5 in fp32. And the step
masks themselves: per layout, the distinct masks and their class table equal the index-causal
mask of each (device, step) pair."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.ops.attention import dense_attention
from qwenjax.ops.context_layout import permutation
from qwenjax.ops.ring_attention import ring_attention, to_layout
from qwenjax.ops.ring_splash import step_masks
from qwenjax.sharding import make_mesh


@pytest.mark.parametrize("layout,n,expect", [("contiguous", 4, 2), ("zigzag", 4, 3),
                                             ("striped", 4, 2), ("zigzag", 8, 3)])
def test_step_masks_are_the_index_causal_mask_of_every_step(layout, n, expect):
    t = 16 * (2 if layout == "zigzag" else 1)
    masks, classes = step_masks(layout, n, t)
    assert len(masks) == expect  # a few static masks, whatever the ring size
    g = permutation(t * n, n, layout).reshape(n, t)  # global index of each device's slots
    for s in range(n):
        for r in range(n):
            want = g[r][:, None] >= g[(r - s) % n][None, :]
            if classes[s, r] < 0:
                assert not want.any()
            else:
                np.testing.assert_array_equal(masks[classes[s, r]][:, :], want)


def _packed(B, T, n, layout):
    """Row 0: four documents with edges inside shards; row 1: one document after 5 padding
    tokens (segment 0). Positions restart per document. In `layout` order."""
    pos = np.tile(np.arange(T), (B, 1))
    seg = np.ones((B, T), np.int32)
    cuts = [0, 37, T // 2 + 3, T // 2 + T // 5, T]
    for d in range(4):
        seg[0, cuts[d]:cuts[d + 1]] = d + 1
        pos[0, cuts[d]:cuts[d + 1]] = np.arange(cuts[d + 1] - cuts[d])
    seg[1:, :5] = 0
    return (jnp.asarray(to_layout(x, n, layout)) for x in (pos, seg))


@pytest.mark.parametrize("layout,batch_axis", [("zigzag", None), ("contiguous", None),
                                               ("striped", "data")])
def test_ring_with_splash_matches_dense(layout, batch_axis):
    n, B, T, H, K, Dh = 4, 2, 512, 4, 2, 128
    shape = {"data": 2, "context": n} if batch_axis else {"context": n}
    mesh = make_mesh(shape, jax.devices()[:2 * n if batch_axis else n])
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, Dh))
    k, v = (jax.random.normal(kk, (B, T, K, Dh)) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (B, T, H, Dh))
    pos, seg = _packed(B, T, n, layout)

    def ring(q, k, v):
        return ring_attention(q, k, v, mesh=mesh, q_positions=pos, q_segment_ids=seg,
                              kernel="splash", layout=layout, splash_block=128, interpret=True,
                              batch_axes=batch_axis)

    def dense(q, k, v):
        return dense_attention(q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg)

    def out_and_grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w)

    out, grads = jax.jit(out_and_grads, static_argnums=0)(ring)
    ref, ref_grads = jax.jit(out_and_grads, static_argnums=0)(dense)
    assert float(jnp.abs(out - ref).max()) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert float(jnp.abs(g - r).max()) <= 5e-5


def test_ring_with_splash_compiles_for_tpu_with_the_kernels_inside():
    """Compiled for a v5p-8 slice (compile-only devices, no TPU): the ring's steps run splash's
    Mosaic forward (with residuals) and its dq / dkv passes, and nothing else attends."""
    pytest.importorskip("libtpu", reason="the `tpu` extra (libtpu) is not installed")
    from qwenjax.plan.chips import parse_slice, topology_devices
    from qwenjax.plan.hlo import custom_calls

    devices = topology_devices(parse_slice("v5p-8"))
    mesh = make_mesh({"context": 4}, devices[:4])
    B, T, H, K, Dh = 1, 4096, 4, 2, 128
    pos, seg = _packed(B, T, 4, "zigzag")

    def loss(q, k, v):
        o = ring_attention(q, k, v, mesh=mesh, q_positions=pos, q_segment_ids=seg,
                           kernel="splash", layout="zigzag")
        return jnp.sum(o.astype(jnp.float32))

    shapes = [jax.ShapeDtypeStruct((B, T, h, Dh), jnp.bfloat16) for h in (H, K, K)]
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile().as_text()
    calls = {name for name in custom_calls(hlo) if name.startswith("tpu_custom_call")}
    assert any("splash_mha_fwd" in c and "residuals" in c for c in calls), calls
    assert any("splash_mha_dq" in c for c in calls) and any("splash_mha_dkv" in c for c in calls)
