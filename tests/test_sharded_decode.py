"""Sequence-sharded inference: with the KV cache split along its slots over `context=4`,
prefill and decoding (partial attention per shard, merged by log-sum-exp) give the same tokens
and the same logits as one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwenjax
from qwenjax.infer.cache import decode_step, init_cache, left_pad, prefill
from qwenjax.infer.generate import generate
from qwenjax.model.partition import state_shardings
from qwenjax.sharding import activate


@pytest.mark.parametrize("preset", ["qwen3-moe-tiny", "qwen3.5-moe-tiny"])
def test_context_sharded_cache_decodes_like_one_device(preset):
    cfg = qwenjax.load_preset(preset).replace(num_layers=4 if "3.5" in preset else 2)
    model = qwenjax.init_model(cfg, seed=1)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (13, 6)]
    mesh = qwenjax.make_mesh({"context": 4}, jax.devices()[:4])
    graphdef, params = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(params, state_shardings(params, mesh)))

    want = generate(model, prompts, max_new_tokens=12, prefill_chunk=8)
    got = generate(sharded, prompts, max_new_tokens=12, prefill_chunk=8, mesh=mesh)
    assert got == want

    # The logits behind those tokens, and the cache really split along its slots.
    ids, pos, seg = left_pad(prompts, 16)

    def run(m):
        cache = init_cache(m.config, 2, 32)
        logits, cache = prefill(m, cache, ids, pos, seg, chunk=8)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        step_logits, cache = decode_step(m, cache, token, jnp.asarray([13, 6], jnp.int32))
        return logits, step_logits, cache

    ref = jax.jit(run)(model)
    with activate(mesh):
        out = jax.jit(run)(sharded)
    for a, b in zip(out[:2], ref[:2]):
        assert float(jnp.abs(a - b).max()) <= 1e-4
    k = next(x for x in jax.tree.leaves(out[2]) if x.ndim == 5 and x.shape[2] == 32)  # keys
    assert {s.data.shape[2] for s in k.addressable_shards} == {32 // 4}


@pytest.mark.parametrize("preset,shape,layout", [
    ("qwen3-moe-tiny", {"context": 4}, "zigzag"),
    ("qwen3.5-moe-tiny", {"context": 4}, "zigzag"),
    ("qwen3.5-moe-tiny", {"data": 2, "context": 2}, "contiguous"),
])
def test_context_prefill_runs_ring_and_parallel_scan(preset, shape, layout, monkeypatch):
    """Under a context mesh the whole prompt goes through ring attention and the parallel
    delta-rule scan (not replicated chunks over the cache), and fills the same cache: the last
    prompt logits and two decoding steps match one device's chunked prefill. One prompt is
    shorter than the conv window (K-1 = 3), so its window keeps padding zeros."""
    from qwenjax.model import sequence_ops

    cfg = qwenjax.load_preset(preset).replace(num_layers=4 if "3.5" in preset else 2)
    model = qwenjax.init_model(cfg, seed=2)
    mesh = qwenjax.make_mesh(shape, jax.devices()[:4])
    graphdef, params = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(params, state_shardings(params, mesh)))
    rng = np.random.RandomState(1)
    sizes = (21, 32, 9, 2)
    prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in sizes]
    ids, pos, seg = left_pad(prompts, 32)
    lengths = jnp.asarray(sizes, jnp.int32)

    calls = {"ring": 0, "scan": 0}

    def counted(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(sequence_ops, "ring_attention", counted("ring", sequence_ops.ring_attention))
    monkeypatch.setattr(sequence_ops, "delta_rule_sequence_parallel",
                        counted("scan", sequence_ops.delta_rule_sequence_parallel))

    def run(m):
        cache = init_cache(m.config, len(sizes), 48)
        logits, cache = prefill(m, cache, ids, pos, seg, chunk=8)
        out = [logits]
        for i in range(2):
            token = jnp.argmax(out[-1], -1).astype(jnp.int32)
            step_logits, cache = decode_step(m, cache, token, lengths + i)
            out.append(step_logits)
        return out

    ref = jax.jit(run)(model)
    assert calls == {"ring": 0, "scan": 0}
    with activate(mesh, context_layout=layout):
        out = jax.jit(run)(sharded)
    # one trace: every attention layer stack ran the ring, every Gated DeltaNet stack the scan
    assert calls["ring"] >= 1
    assert calls["scan"] >= (1 if "3.5" in preset else 0)
    for a, b in zip(out, ref):
        assert float(jnp.abs(a - b).max()) <= 1e-4
