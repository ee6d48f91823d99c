"""Sequence (context) parallelism through the whole model: with the sequence split over
`context` (zigzag layout), ring attention and the sequence-parallel delta rule give the logits,
loss and gradients of one device, also combined with `expert` and `data`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import qwenjax
from qwenjax.model.partition import state_shardings
from qwenjax.ops.context_layout import from_layout, to_layout
from qwenjax.sharding import activate, logical_to_spec
from qwenjax.train.loss import Batch
from qwenjax.train.step import make_loss_and_grad, split_model

B, T = 4, 64
CASES = [
    ("qwen3-moe-tiny", {"context": 4}, "zigzag"),
    ("qwen3-moe-tiny", {"context": 2, "expert": 2, "data": 2}, "contiguous"),
    ("qwen3.5-moe-tiny", {"context": 4}, "zigzag"),
    ("qwen3.5-moe-tiny", {"context": 2, "expert": 2, "data": 2}, "zigzag"),
]


def packed_batch(vocab: int) -> Batch:
    """Two documents per row, the boundary at a different place in each row (some inside a
    context shard, one exactly at a shard edge)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, vocab, (B, T + 1))
    cut = np.array([16, 29, 40, 51])[:, None]
    t = np.arange(T)[None]
    seg = np.where(t < cut, 1, 2).astype(np.int32)
    pos = np.where(t < cut, t, t - cut).astype(np.int32)
    return Batch(input_ids=ids[:, :-1], targets=ids[:, 1:], loss_mask=np.ones((B, T), np.float32),
                 positions=pos, segment_ids=seg)


def tiny_config(name: str):
    return qwenjax.load_preset(name).replace(num_layers=2 if name == "qwen3-moe-tiny" else 4)


@functools.cache
def reference(name: str):
    cfg = tiny_config(name)
    graphdef, params = split_model(qwenjax.init_model(cfg))
    batch = packed_batch(cfg.vocab_size)
    model = nnx.merge(graphdef, params)
    logits = model(jnp.asarray(batch.input_ids), positions=jnp.asarray(batch.positions),
                   segment_ids=jnp.asarray(batch.segment_ids))
    (loss, _), grads = make_loss_and_grad(graphdef, aux_weight=0.01)(params, batch)
    return graphdef, params, batch, logits, loss, grads


@pytest.mark.parametrize("name,shape,layout", CASES, ids=str)
def test_context_parallel_equals_one_device(name, shape, layout):
    check_against_one_device(name, shape, layout)


@pytest.mark.parametrize("name,shape", [("qwen3.5-moe-tiny", {"context": 4}),
                                        ("qwen3-moe-tiny", {"context": 2, "expert": 2, "data": 2})],
                         ids=str)
def test_experts_over_token_chunks_equal_one_device(name, shape):
    """runtime.moe_chunk_tokens (the 1M-token step's memory setting): each device's tokens (64 on
    context 4, 32 on the 2 x 2 x 2 mesh) through the experts 16 at a time give one device's
    unchunked logits, loss and gradients."""
    check_against_one_device(name, shape, "zigzag", moe_chunk_tokens=16)


def check_against_one_device(name, shape, layout, **runtime):
    graphdef, params, batch, logits, loss, grads = reference(name)
    if runtime:
        cfg = tiny_config(name)  # the same weights, run another way
        graphdef, _ = split_model(qwenjax.init_model(cfg.replace(runtime=cfg.runtime.replace(**runtime))))
    mesh = qwenjax.make_mesh(shape, jax.devices()[: int(np.prod(list(shape.values())))])
    n = mesh.shape["context"]
    spec = PartitionSpec(logical_to_spec(("batch",), None, mesh)[0], "context")
    laid = jax.tree.map(
        lambda x: jax.device_put(to_layout(np.asarray(x), n, layout), NamedSharding(mesh, spec)),
        batch)
    sharded = jax.device_put(params, state_shardings(params, mesh))
    with activate(mesh, None, layout):
        model = nnx.merge(graphdef, sharded)
        out = jax.jit(lambda ids, pos, seg: model(ids, positions=pos, segment_ids=seg))(
            laid.input_ids, laid.positions, laid.segment_ids)
        (loss_s, _), grads_s = jax.jit(make_loss_and_grad(graphdef, aux_weight=0.01))(sharded, laid)
    assert float(jnp.abs(from_layout(np.asarray(out), n, layout) - logits).max()) <= 1e-5
    assert abs(float(loss_s - loss)) <= 1e-5
    rel = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12)),
                       grads_s, grads)
    assert max(jax.tree.leaves(rel)) <= 1e-5
