"""Sequence-parallel Gated DeltaNet (delta rule and causal conv over the `context` axis) = the
single-device dense ops on the global-order sequence, forward and gradients, on 8 simulated CPU
devices: contiguous / zigzag layouts, 2 / 4 / 8 context devices, initial state, packed documents
with boundaries inside shards and exactly at piece boundaries, GQA heads, batch and head axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.ops.context_layout import from_layout, to_layout
from qwenjax.ops.delta_rule import causal_conv, delta_rule_chunked
from qwenjax.ops.delta_rule_parallel import (
    causal_conv_sequence_parallel,
    delta_rule_sequence_parallel,
)
from qwenjax.sharding import make_mesh as _make_mesh

C, DK, DV = 16, 8, 8  # chunk length, key / value head dims
OUT_TOL, GRAD_TOL = 1e-5, 1e-4


def make_mesh(shape):
    """A mesh over the first prod(sizes) of the 8 simulated devices."""
    return _make_mesh(shape, jax.devices()[: int(np.prod(list(shape.values())))])


def _inputs(B, T, Hk, H, seed=0):
    """Selective gates as the model makes them (g = -A softplus(.), A spread 0.01..16 over
    heads), beta in (0, 1), raw q / k (l2-normalised in the kernel), a random initial state."""
    rng = np.random.default_rng(seed)
    A = np.exp(np.linspace(np.log(0.01), np.log(16.0), H))
    x = {
        "q": rng.normal(size=(B, T, Hk, DK)),
        "k": rng.normal(size=(B, T, Hk, DK)),
        "v": rng.normal(size=(B, T, H, DV)),
        "g": -A * np.logaddexp(0.0, rng.normal(size=(B, T, H)) - 1.0),
        "beta": 1.0 / (1.0 + np.exp(-rng.normal(size=(B, T, H)))),
        "initial_state": rng.normal(size=(B, H, DK, DV)),
    }
    return {name: jnp.asarray(a, jnp.float32) for name, a in x.items()}


def _segment_ids(B, T, starts):
    """[B,T] int32: a new document at each global position in `starts` (row b shifted by b)."""
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        for s in starts:
            ids[b, min(T - 1, s + b) :] += 1
    return jnp.asarray(ids)


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _loss_and_grads(fn, x, seed=1):
    """fn(**x) -> (out [B,T,H,Dv] global order, state); a random linear loss over both."""
    rng = np.random.default_rng(seed)
    w_out = jnp.asarray(rng.normal(size=x["v"].shape), jnp.float32)
    w_state = jnp.asarray(rng.normal(size=x["initial_state"].shape), jnp.float32)

    def loss(x):
        out, state = fn(**x)
        return jnp.sum(out * w_out) + jnp.sum(state * w_state), (out, state)

    (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    return aux, grads


CASES = {
    # name: (mesh, layout, B, T, Hk, H, document starts or None, with initial state, axes)
    "data2-ctx2-tensor2-contiguous": (
        {"data": 2, "context": 2, "tensor": 2},
        "contiguous",
        2,
        64,
        2,
        4,
        (16, 37),  # row 1 is shifted by one token: 17, 38
        True,
        {"batch_axes": "data", "head_axes": "tensor"},
    ),
    "ctx4-zigzag-docs-gqa": (
        {"context": 4},
        "zigzag",
        1,
        128,
        1,
        2,
        # 16 and 96 start pieces (96: device 1's second one), so the state entering them must
        # be dropped; 40, 44 fall inside pieces; the document 44..95 spans pieces of 3 devices
        (16, 40, 44, 96, 100),
        True,
        {},
    ),
    "ctx4-contiguous-docs": ({"context": 4}, "contiguous", 1, 128, 2, 2, (32, 50), True, {}),
    # pieces of 8 tokens, shorter than a chunk; no documents, zero initial state
    "ctx8-zigzag": ({"context": 8}, "zigzag", 1, 128, 2, 2, None, False, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_delta_rule_sequence_parallel_matches_single_device(case):
    mesh_shape, layout, B, T, Hk, H, starts, with_state, axes = CASES[case]
    n = mesh_shape["context"]
    mesh = make_mesh(mesh_shape)
    x = _inputs(B, T, Hk, H)
    ids = None if starts is None else _segment_ids(B, T, starts)
    if not with_state:
        x["initial_state"] = jnp.zeros_like(x["initial_state"])

    def reference(initial_state, **a):
        return delta_rule_chunked(**a, initial_state=initial_state, chunk_size=C, segment_ids=ids)

    def parallel(initial_state, **a):
        a = {name: to_layout(t, n, layout) for name, t in a.items()}
        out, state = delta_rule_sequence_parallel(
            **a,
            mesh=mesh,
            layout=layout,
            segment_ids=None if ids is None else to_layout(ids, n, layout),
            initial_state=initial_state if with_state else None,
            chunk_size=C,
            **axes,
        )
        return from_layout(out, n, layout), state

    (out, state), grads = _loss_and_grads(parallel, x)
    (out_ref, state_ref), grads_ref = _loss_and_grads(reference, x)
    assert _max_diff(out, out_ref) <= OUT_TOL
    assert _max_diff(state, state_ref) <= OUT_TOL
    if not with_state:
        grads.pop("initial_state"), grads_ref.pop("initial_state")
    assert _max_diff(grads, grads_ref) <= GRAD_TOL


def test_striped_layout_is_refused():
    x = _inputs(1, 64, 2, 2)
    with pytest.raises(ValueError, match="striped"):
        delta_rule_sequence_parallel(
            x["q"],
            x["k"],
            x["v"],
            x["g"],
            x["beta"],
            mesh=make_mesh({"context": 4}),
            layout="striped",
        )


CONV_CASES = {
    # name: (mesh, layout, B, T, document starts or None, axes)
    "data2-ctx2-tensor2-contiguous": (
        {"data": 2, "context": 2, "tensor": 2},
        "contiguous",
        2,
        32,
        (16, 21),
        {"batch_axes": "data", "head_axes": "tensor"},
    ),
    "ctx4-zigzag-docs": ({"context": 4}, "zigzag", 1, 64, (8, 10, 21, 40), {}),
    # pieces of 2 tokens: a halo spans the two pieces before (on two other devices)
    "ctx8-zigzag-short-pieces": ({"context": 8}, "zigzag", 1, 32, None, {}),
    "ctx4-striped-docs": ({"context": 4}, "striped", 1, 32, (6, 13), {}),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_causal_conv_sequence_parallel_matches_single_device(case):
    mesh_shape, layout, B, T, starts, axes = CONV_CASES[case]
    n, K, H, Dh = mesh_shape["context"], 4, 2, 8
    mesh = make_mesh(mesh_shape)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T, H, Dh)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(K, H, Dh)), jnp.float32)
    w_out = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    ids = _segment_ids(B, T, starts or ())

    def parallel(x, w):
        out = causal_conv_sequence_parallel(
            to_layout(x, n, layout),
            w,
            None if starts is None else to_layout(ids, n, layout),
            mesh=mesh,
            layout=layout,
            **axes,
        )
        return from_layout(out, n, layout)

    def value_and_grads(fn):
        def loss(x, w):
            out = fn(x, w)
            return jnp.sum(out * w_out), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)

    (_, out), grads = value_and_grads(parallel)
    (_, ref), grads_ref = value_and_grads(lambda x, w: causal_conv(x, w, ids))
    assert _max_diff(out, ref) <= OUT_TOL
    assert _max_diff(grads, grads_ref) <= GRAD_TOL
