"""Routing semantics and the dropless grouped FFN against the dense per-token reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.ops.moe_dispatch import (
    block_rows,
    dense_moe_reference,
    dispatch_plan,
    grouped_ffn,
    over_token_chunks,
    route,
)


def _experts(E=6, D=16, F=24, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (E, D, F)) * 0.2, jax.random.normal(ks[1], (E, D, F)) * 0.2,
            jax.random.normal(ks[2], (E, F, D)) * 0.2)


def test_route_matches_transformers_semantics():
    logits = jax.random.normal(jax.random.key(1), (50, 6))
    for norm in (False, True):
        w, idx, _probs = route(logits, 2, norm)
        p = np.asarray(jax.nn.softmax(logits, -1))
        top = np.argsort(-p, axis=-1)[:, :2]
        np.testing.assert_array_equal(np.asarray(idx), top)
        expect = np.take_along_axis(p, top, -1)
        if norm:
            expect = expect / expect.sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(w), expect, rtol=1e-6)


@pytest.mark.parametrize("impl", ["blocked", "ragged"])
@pytest.mark.parametrize("N,k,block", [(37, 2, 64), (200, 3, 16), (5, 1, 8)])
def test_grouped_ffn_matches_dense(impl, N, k, block):
    wg, wu, wd = _experts()
    x = jax.random.normal(jax.random.key(2), (N, 16))
    weights, experts, _ = route(jax.random.normal(jax.random.key(3), (N, 6)), k, True)
    y = grouped_ffn(x, weights, experts, wg, wu, wd, impl=impl, block=block)
    ref = dense_moe_reference(x, weights, experts, wg, wu, wd)
    assert float(jnp.abs(y - ref).max()) <= 1e-5

    def loss(f):
        return lambda x, wg, wu, wd: jnp.sum(jnp.sin(f(x, weights, experts, wg, wu, wd)))

    ours = jax.grad(loss(lambda *a: grouped_ffn(*a, impl=impl, block=block)), argnums=(0, 1, 2, 3))
    dense = jax.grad(loss(dense_moe_reference), argnums=(0, 1, 2, 3))
    for a, b in zip(ours(x, wg, wu, wd), dense(x, wg, wu, wd)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(1.0, float(jnp.abs(b).max()))


@pytest.mark.parametrize("impl", ["blocked", "ragged"])
def test_grouped_ffn_over_token_chunks_matches_dense(impl):
    """runtime.moe_chunk_tokens on unsplit tokens: 200 tokens in 4 remat'd chunks of 50 give the
    dense values and gradients."""
    wg, wu, wd = _experts()
    x = jax.random.normal(jax.random.key(2), (200, 16))
    weights, experts, _ = route(jax.random.normal(jax.random.key(3), (200, 6)), 2, True)
    def ffn(x, weights, experts, *w):
        one = lambda x, weights, experts: grouped_ffn(x, weights, experts, *w, impl=impl, block=16)
        return over_token_chunks(one, 50)(x, weights, experts)

    def loss(f):
        return lambda x, wg, wu, wd: jnp.sum(jnp.sin(f(x, weights, experts, wg, wu, wd)))

    ref = dense_moe_reference(x, weights, experts, wg, wu, wd)
    assert float(jnp.abs(ffn(x, weights, experts, wg, wu, wd) - ref).max()) <= 1e-5
    ours = jax.jit(jax.grad(loss(ffn), argnums=(0, 1, 2, 3)))
    dense = jax.grad(loss(dense_moe_reference), argnums=(0, 1, 2, 3))
    for a, b in zip(ours(x, wg, wu, wd), dense(x, wg, wu, wd)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(1.0, float(jnp.abs(b).max()))


def test_dropless_when_every_token_picks_one_expert():
    """A router that sends all tokens to expert 3 drops nothing: each token's output is exact."""
    wg, wu, wd = _experts()
    x = jax.random.normal(jax.random.key(4), (64, 16))
    experts = jnp.full((64, 1), 3, jnp.int32)
    weights = jnp.ones((64, 1))
    y = grouped_ffn(x, weights, experts, wg, wu, wd, impl="blocked", block=8)
    per_token = (jax.nn.silu(x @ wg[3]) * (x @ wu[3])) @ wd[3]
    assert float(jnp.abs(y - per_token).max()) <= 1e-5


@pytest.mark.parametrize("one_expert", [False, True], ids=["spread", "one_expert"])
def test_blocked_vjp_matches_dense(one_expert):
    """The blocked path's hand-written VJP against autodiff of the dense reference, gradients of
    the routing weights included: routing spread over the experts, and a router that sends
    every token to expert 3 (k=1, all rows one group). Both leave empty blocks, which are
    skipped."""
    N, k, block = 96, 1 if one_expert else 2, 8
    wg, wu, wd = _experts()
    x = jax.random.normal(jax.random.key(5), (N, 16))
    logits = jax.random.normal(jax.random.key(6), (N, 6))
    if one_expert:
        logits = logits + 30.0 * (jnp.arange(6) == 3)
    weights, experts, _ = route(logits, k, False)
    plan = dispatch_plan(experts, 6, block_rows(N * k // 6, block))
    assert int(jnp.sum(plan.block_expert == 6)) > 0  # some blocks are empty
    assert bool(jnp.all(experts == 3)) == one_expert

    def loss(f):
        return lambda *a: jnp.sum(jnp.sin(f(a[0], a[1], experts, *a[2:])))

    args = (x, weights, wg, wu, wd)
    ref = dense_moe_reference(x, weights, experts, wg, wu, wd)
    y = grouped_ffn(x, weights, experts, wg, wu, wd, impl="blocked", block=block)
    assert float(jnp.abs(y - ref).max()) <= 1e-5
    ours = jax.grad(loss(lambda *a: grouped_ffn(*a, impl="blocked", block=block)), argnums=range(5))
    dense = jax.grad(loss(dense_moe_reference), argnums=range(5))
    for a, b in zip(ours(*args), dense(*args)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(1.0, float(jnp.abs(b).max()))


@pytest.mark.parametrize("kernel,bm", [("xla", 4), ("xla", 16), ("megablox", 16)])
def test_grouped_matmul_gradients_match_ragged_dot(kernel, bm):
    """Both kernels against ragged_dot and its own VJP: our XLA weight gradient (blocks of real
    rows in a while loop) and megablox's gmm / tgmm (Pallas, interpret mode on CPU); empty
    groups, groups smaller and larger than a block, rows past the groups (zeros), a last block
    that reaches the buffer's end."""
    from qwenjax.ops.grouped_matmul import grouped_matmul

    rng = np.random.default_rng(0)
    R, K, N = 50, 12, 10
    for sizes in ([0, 7, 1, 0, 30], [50, 0, 0, 0, 0], [3, 3, 3, 3, 3]):
        sizes = jnp.asarray(sizes, jnp.int32)
        x = jnp.asarray(rng.standard_normal((R, K)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((5, K, N)), jnp.float32)
        ct = jnp.asarray(rng.standard_normal((R, N)), jnp.float32)
        ours = jax.vjp(lambda x, w, s=sizes: grouped_matmul(x, w, s, bm, kernel), x, w)
        ref = jax.vjp(lambda x, w, s=sizes: jax.lax.ragged_dot(x, w, s), x, w)
        assert np.abs(np.asarray(ours[0]) - np.asarray(ref[0])).max() <= 1e-5
        for a, b in zip(ours[1](ct), ref[1](ct)):
            assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * (1 + np.abs(b).max())
