"""Splash attention (ops/splash.py), the Pallas TPU kernel, run in interpret mode on CPU against
the dense reference: packed documents (segment ids), GQA, head dims 128 and 256; under a mesh
(shard_map over the batch); the kernel choice (`runtime.attention_impl`) by platform and shape;
and a whole model with splash equal to the same model with our kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from qwenjax.errors import ConfigError
from qwenjax.model.sequence_ops import attention_impl
from qwenjax.ops.attention import dense_attention
from qwenjax.ops.splash import splash_causal_attention
from qwenjax.sharding import activate


def _inputs(B, T, H, K, Dh, dtype, cuts=(100, 200)):
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal(s), dtype)
               for s in ((B, T, H, Dh), (B, T, K, Dh), (B, T, K, Dh)))
    cut = np.array(cuts[:B])[:, None]
    t = np.arange(T)[None]
    seg = jnp.asarray(np.where(t < cut, 1, 2), jnp.int32)
    pos = jnp.asarray(np.where(t < cut, t, t - cut), jnp.int32)
    return q, k, v, seg, pos


@pytest.mark.parametrize("Dh,dtype,fwd_tol,grad_tol", [
    (128, jnp.float32, 1e-5, 5e-5), (256, jnp.float32, 1e-5, 5e-5),
    (128, jnp.bfloat16, 3e-2, 6e-2),  # bf16 inputs: the rounding of bf16 outputs (2^-8 relative)
])
def test_splash_matches_dense_reference(Dh, dtype, fwd_tol, grad_tol):
    """Two documents per row (edges at 100 and 200 of 256), 4 query heads on 2 kv heads."""
    q, k, v, seg, pos = _inputs(2, 256, 4, 2, Dh, dtype)
    ours = lambda q, k, v: splash_causal_attention(q, k, v, seg, block=128, interpret=True)
    ref = lambda q, k, v: dense_attention(q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg)
    f32 = lambda x: x.astype(jnp.float32)
    assert float(jnp.abs(f32(ours(q, k, v)) - f32(ref(q, k, v))).max()) <= fwd_tol
    do = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), dtype)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f32(f(*a) * do)), argnums=(0, 1, 2))(q, k, v)
             for f in (ours, ref)]
    for a, b in zip(*grads):
        assert float(jnp.abs(f32(a) - f32(b)).max()) <= grad_tol


def test_splash_under_a_mesh_equals_one_device():
    """batch over data=2 and query/kv heads over tensor=2: the kernel runs in a shard_map."""
    q, k, v, seg, _ = _inputs(2, 128, 4, 2, 128, jnp.float32, cuts=(50, 90))
    one = splash_causal_attention(q, k, v, seg, interpret=True)
    mesh = qwenjax.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    with activate(mesh):
        sharded = jax.jit(lambda *a: splash_causal_attention(*a, interpret=True))(q, k, v, seg)
    assert float(jnp.abs(sharded - one).max()) <= 1e-6


def test_kernel_choice_by_platform_and_shape():
    assert attention_impl("auto", 256, 128) == "xla"  # this CPU host, no mesh
    mesh = qwenjax.make_mesh({"data": 1}, jax.devices()[:1])
    with activate(mesh, platform="tpu"):
        assert attention_impl("auto", 256, 128) == "splash"
        assert attention_impl("auto", 256, 16) == "xla"  # head_dim not a multiple of 128
        assert attention_impl("auto", 200, 128) == "xla"  # length not a multiple of 128
        assert attention_impl("xla", 256, 128) == "xla"
    with pytest.raises(ConfigError, match="head_dim 16"):
        attention_impl("splash", 256, 16)


def test_model_with_splash_equals_model_with_ours():
    """A tiny Qwen3.5-MoE (gated attention + Gated DeltaNet) at head_dim 128: logits with
    runtime.attention_impl splash (interpret mode) within 1e-5 of our kernel's, packed rows."""
    cfg = qwenjax.load_preset("qwen3.5-moe-tiny").replace(
        head_dim=128, num_layers=2, layer_types=("linear_attention", "full_attention"))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 128)))
    seg = jnp.asarray(np.where(np.arange(128)[None] < np.array([[40], [77]]), 1, 2), jnp.int32)
    out = {}
    for impl in ("xla", "splash"):
        model = qwenjax.init_model(cfg.with_runtime(attention_impl=impl), seed=0)
        out[impl] = model(ids, segment_ids=seg)
    assert float(jnp.abs(out["splash"] - out["xla"]).max()) <= 1e-5


def test_model_under_context_parallel_with_ring_splash_equals_ours():
    """The same model over context=2 (zigzag): ring attention with splash as its step kernel
    (runtime.attention_impl splash, interpret mode) against ours, packed rows, in layout."""
    from qwenjax.ops.context_layout import from_layout, to_layout

    cfg = qwenjax.load_preset("qwen3.5-moe-tiny").replace(
        head_dim=128, num_layers=1, layer_types=("full_attention",))
    T, n = 512, 2
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T))
    cut = np.array([[300]])
    t = np.arange(T)[None]
    seg, pos = np.where(t < cut, 1, 2), np.where(t < cut, t, t - cut)
    laid = [jnp.asarray(to_layout(x, n, "zigzag")) for x in (ids, pos, seg)]
    mesh = qwenjax.make_mesh({"context": n}, jax.devices()[:n])
    out = {}
    for impl in ("xla", "splash"):
        model = qwenjax.init_model(cfg.with_runtime(attention_impl=impl), seed=0)
        with activate(mesh, None, "zigzag"):
            logits = jax.jit(lambda i, p, s, m=model: m(i, positions=p, segment_ids=s))(*laid)
        out[impl] = from_layout(np.asarray(logits), n, "zigzag")
    assert float(np.abs(out["splash"] - out["xla"]).max()) <= 1e-5
