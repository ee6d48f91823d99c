"""Expert parallelism (all-to-all dispatch) equals the dense per-token computation, on meshes of
8 simulated devices; dropless never drops; capacity mode drops exactly what it reports."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwenjax
from qwenjax.ops.expert_parallel import (
    expert_parallel_ffn,
    grouped_rows_ffn,
    receive_rows,
    single_device_mesh,
)
from qwenjax.ops.moe_dispatch import dense_moe_reference, route

E, D, F, K = 16, 16, 12, 2
B, T = 8, 6
MESHES = [
    ({"expert": 8}, (("expert",), None)),
    ({"data": 2, "expert": 4}, (("data", "expert"), None)),
    ({"fsdp": 2, "expert": 2, "tensor": 2}, (("fsdp", "expert"), None)),
]


def problem(seed=0, logits=None):
    r = np.random.RandomState(seed)
    x = jnp.asarray(r.randn(B, T, D), jnp.float32)
    w = tuple(jnp.asarray(r.randn(*s) * 0.3, jnp.float32) for s in [(E, D, F), (E, D, F), (E, F, D)])
    logits = jnp.asarray(r.randn(B * T, E) if logits is None else logits, jnp.float32)
    weights, experts, _ = route(logits, K, True)
    return x, w, weights, experts


def run(mesh, tokens, x, w, weights, experts, capacity=0.0, chunk_tokens=0):
    def f(x, *w):
        return expert_parallel_ffn(
            x, weights.reshape(B, T, K), experts.reshape(B, T, K), *w, mesh=mesh,
            token_spec=tokens, capacity_factor=capacity, chunk_tokens=chunk_tokens,
        )

    y, dropped = jax.jit(f)(x, *w)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a)[0])), argnums=(0, 1, 2, 3)))(x, *w)
    return y, dropped, grads


def reference(x, w, weights, experts):
    def f(x, *w):
        return dense_moe_reference(x.reshape(-1, D), weights, experts, *w).reshape(B, T, D)

    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2, 3))(x, *w)
    return f(x, *w), grads


def assert_close(y, grads, y_ref, grads_ref):
    assert float(jnp.abs(y - y_ref).max()) <= 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert float(jnp.abs(g - g_ref).max() / jnp.abs(g_ref).max()) <= 1e-5


@pytest.mark.parametrize("shape,tokens", MESHES, ids=lambda s: str(s))
def test_expert_parallel_equals_dense(shape, tokens):
    x, w, weights, experts = problem()
    y, dropped, grads = run(qwenjax.make_mesh(shape), tokens, x, w, weights, experts)
    assert_close(y, grads, *reference(x, w, weights, experts))
    assert float(dropped) == 0.0


@pytest.mark.parametrize("shape,tokens", MESHES[:2], ids=lambda s: str(s))
@pytest.mark.parametrize("chunk", [2, 3])
def test_expert_parallel_over_token_chunks_equals_dense(shape, tokens, chunk):
    """`chunk_tokens` (runtime.moe_chunk_tokens): each device's 6 tokens in chunks of 2 or 3,
    exchange and all, give the dense values and gradients; a chunk that does not divide the
    tokens per device is refused in one line."""
    x, w, weights, experts = problem()
    mesh = qwenjax.make_mesh(shape)
    y, dropped, grads = run(mesh, tokens, x, w, weights, experts, chunk_tokens=chunk)
    assert_close(y, grads, *reference(x, w, weights, experts))
    assert float(dropped) == 0.0
    with pytest.raises(qwenjax.ConfigError, match="moe_chunk_tokens 4 does not divide the 6"):
        run(mesh, tokens, x, w, weights, experts, chunk_tokens=4)


def test_fsdp_split_expert_weights_gather_inside_and_reduce_scatter_back():
    """Expert weights with D split over fsdp (the default axis table) are gathered inside the
    expert-parallel body: same values and gradients as dense, and the weight gradients leave
    as reduce-scatters over fsdp (the transpose of the inner all_gather)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x, w, weights, experts = problem()
    mesh = qwenjax.make_mesh({"fsdp": 2, "expert": 4})
    specs = (P("expert", "fsdp", None), P("expert", "fsdp", None), P("expert", None, "fsdp"))
    w = tuple(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(w, specs))

    def f(x, *w):
        return expert_parallel_ffn(
            x, weights.reshape(B, T, K), experts.reshape(B, T, K), *w, mesh=mesh,
            token_spec=(("fsdp", "expert"), None), embed_axes=("fsdp",),
        )

    loss = lambda *a: jnp.sum(jnp.sin(f(*a)[0]))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    assert_close(jax.jit(f)(x, *w)[0], grad(x, *w), *reference(x, w, weights, experts))
    assert "reduce-scatter" in grad.lower(x, *w).compile().as_text()


def test_dropless_when_every_token_picks_the_same_experts():
    # Experts 0 and 1 both live on device 0 (16 experts / 8 devices): it receives every row.
    logits = np.zeros((B * T, E))
    logits[:, 0], logits[:, 1] = 5.0, 4.0
    x, w, weights, experts = problem(logits=logits)
    assert np.all(np.asarray(experts)[:, 0] == 0)
    y, dropped, grads = run(qwenjax.make_mesh({"expert": 8}), (("expert",), None), x, w, weights,
                            experts)
    assert_close(y, grads, *reference(x, w, weights, experts))
    assert float(dropped) == 0.0


def kept_by_capacity(experts, n_devices, capacity):
    """numpy oracle: per device (its B/n_devices rows of tokens; or per chunk of them, groups of
    consecutive tokens), each expert keeps its first C routed rows in (token, choice) order."""
    ex = np.asarray(experts).reshape(n_devices, -1)  # [device, n*k] in routed-row order
    C = max(1, math.ceil(capacity * ex.shape[1] / E))
    kept = np.zeros_like(ex, bool)
    for d in range(n_devices):
        for e in range(E):
            rows = np.nonzero(ex[d] == e)[0]
            kept[d, rows[:C]] = True
    return kept.reshape(-1, K)


@pytest.mark.parametrize("capacity,chunk", [(0.5, 0), (1.0, 0), (1.0, 3)])
def test_capacity_mode_drops_exactly_what_it_reports(capacity, chunk):
    """With chunk_tokens (3 of each device's 6 tokens) the capacity holds per chunk."""
    logits = np.random.RandomState(1).randn(B * T, E)
    logits[: B * T // 2, 3] += 3.0  # an overloaded expert
    x, w, weights, experts = problem(logits=logits)
    mesh = qwenjax.make_mesh({"data": 2, "expert": 4})
    y, dropped, grads = run(mesh, (("data", "expert"), None), x, w, weights, experts, capacity,
                            chunk_tokens=chunk)
    kept = kept_by_capacity(experts, 8 * (T // chunk if chunk else 1), capacity)
    assert float(dropped) == float((~kept).sum()) > 0
    masked = weights * jnp.asarray(kept, jnp.float32)  # dropped rows contribute nothing
    assert_close(y, grads, *reference(x, w, masked, experts))


def kept_by_buffer(experts, ep, cap):
    """numpy oracle of a receive buffer of `cap` rows: each device's rows sorted by expert
    (stable); receiver r takes sources in order until full; a source's rows for r past what r
    accepts (its last ones) are dropped."""
    ex = np.asarray(experts).reshape(ep, -1)  # [device, M] in routed-row order
    El = E // ep
    wanted = np.stack([np.bincount(ex[s] // El, minlength=ep) for s in range(ep)])
    before = np.cumsum(wanted, axis=0) - wanted
    accepted = np.clip(cap - before, 0, wanted)
    kept = np.zeros_like(ex, bool)
    for s in range(ep):
        order = np.argsort(ex[s], kind="stable")
        for r in range(ep):
            rows = [i for i in order if ex[s, i] // El == r]
            kept[s, rows[: accepted[s, r]]] = True
    return kept.reshape(-1, K)


@pytest.mark.parametrize("factor", [1.0, 8.0])
def test_receive_buffer_factor_drops_exactly_what_it_reports(factor):
    """`runtime.moe_buffer_factor` (ragged exchange): a receive buffer of factor x the balanced
    rows; with 8.0 (the worst case here) nothing drops; with 1.0 an overloaded device drops the
    rows the oracle names, and the result is the dense one without them."""
    logits = np.random.RandomState(1).randn(B * T, E)
    logits[: B * T // 2, 0] += 4.0  # expert 0 (device 0) overloaded
    x, w, weights, experts = problem(logits=logits)
    mesh = qwenjax.make_mesh({"expert": 8})

    def f(x, *w):
        return expert_parallel_ffn(
            x, weights.reshape(B, T, K), experts.reshape(B, T, K), *w, mesh=mesh,
            token_spec=(("expert",), None), buffer_factor=factor, exchange="ragged",
        )

    y, dropped = jax.jit(f)(x, *w)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a)[0])), argnums=(0, 1, 2, 3)))(x, *w)
    M = B * T * K // 8
    kept = kept_by_buffer(experts, 8, receive_rows(M, 8, factor))
    assert float(dropped) == float((~kept).sum())
    assert (float(dropped) > 0) == (factor < 8)
    masked = weights * jnp.asarray(kept, jnp.float32)
    assert_close(y, grads, *reference(x, w, masked, experts))


def test_capacity_mode_on_one_device_without_a_mesh():
    x, w, weights, experts = problem(2)
    y, dropped, grads = run(single_device_mesh(), (None, None), x, w, weights, experts, 1.0)
    kept = kept_by_capacity(experts, 1, 1.0)
    assert float(dropped) == float((~kept).sum())
    assert_close(y, grads, *reference(x, w, weights * jnp.asarray(kept, jnp.float32), experts))


def test_grouped_rows_skips_empty_slots():
    r = np.random.RandomState(3)
    rows = jnp.asarray(r.randn(40, D), jnp.float32)
    row_expert = jnp.asarray(r.randint(0, 5, 40), jnp.int32)  # 4 experts; 4 = empty slot
    w = [jnp.asarray(r.randn(*s) * 0.3, jnp.float32) for s in [(4, D, F), (4, D, F), (4, F, D)]]
    y = grouped_rows_ffn(rows, row_expert, *w, bm=8, impl="blocked")
    e = np.asarray(row_expert)
    for i in range(40):
        want = np.zeros(D) if e[i] == 4 else np.asarray(
            (jax.nn.silu(rows[i] @ w[0][e[i]]) * (rows[i] @ w[1][e[i]])) @ w[2][e[i]]
        )
        assert np.abs(np.asarray(y[i]) - want).max() <= 1e-5
    for impl in ("ragged", "megablox"):  # megablox: Pallas interpret mode on CPU
        y_impl = grouped_rows_ffn(rows, row_expert, *w, bm=8, impl=impl)
        assert float(jnp.abs(y_impl - y).max()) <= 1e-5, impl


def test_model_in_capacity_mode_reports_dropped_fraction():
    from qwenjax.model.partition import init_sharded
    from qwenjax.sharding import activate
    from qwenjax.train.loss import batch_from_tokens, loss_fn

    mesh = qwenjax.make_mesh({"data": 2, "expert": 4})
    metrics = {}
    for capacity in (0.0, 0.5):
        cfg = qwenjax.load_preset("qwen3-moe-tiny").replace(num_layers=2)
        cfg = cfg.with_runtime(moe_capacity_factor=capacity)
        graphdef, params = init_sharded(cfg, mesh)
        model = nnx.merge(graphdef, params)
        tokens = jnp.asarray(np.random.RandomState(0).randint(0, 512, (8, 33)))
        with activate(mesh):
            _, metrics[capacity] = jax.jit(lambda t, m=model: loss_fn(m, batch_from_tokens(t)))(tokens)
    assert float(metrics[0.0]["dropped_fraction"]) == 0.0
    # Capacity 0.5 keeps at most half of the routed rows.
    assert 0.5 <= float(metrics[0.5]["dropped_fraction"]) < 1.0


def test_ragged_exchange_bookkeeping():
    # On CPU `ragged_all_to_all` is replaced by a padded test double with the same semantics, so
    # this checks the offsets and sizes the ragged (TPU/GPU) exchange computes.
    x, w, weights, experts = problem(4)
    mesh = qwenjax.make_mesh({"data": 2, "expert": 4})

    def f(x, *w):
        return expert_parallel_ffn(x, weights.reshape(B, T, K), experts.reshape(B, T, K), *w,
                                   mesh=mesh, token_spec=(("data", "expert"), None),
                                   exchange="ragged")

    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a)[0])), argnums=(0, 1, 2, 3)))(x, *w)
    assert_close(jax.jit(f)(x, *w)[0], grads, *reference(x, w, weights, experts))
