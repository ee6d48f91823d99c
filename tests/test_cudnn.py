"""cuDNN flash attention on GPU (`runtime.attention_impl: cudnn`, `auto` on a GPU mesh).

No GPU here: the wiring runs on CPU with JAX's reference implementation in the kernel's place
(same call, same arguments, `implementation="xla"`), and the model's train step is lowered for
CUDA with cuDNN's detection stubbed as a Hopper with cuDNN 9.10, so the program a GPU would
compile is checked to hold cuDNN's fused forward and backward custom calls."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from qwenjax.errors import ConfigError
from qwenjax.model.sequence_ops import attention_impl
from qwenjax.ops.attention import attention, dense_attention
from qwenjax.ops.cudnn import cudnn_causal_attention, one_document_rows
from qwenjax.sharding import activate


def _inputs(B=2, T=64, H=4, K=2, Dh=32, packed=False):
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal(s), jnp.float32)
               for s in ((B, T, H, Dh), (B, T, K, Dh), (B, T, K, Dh)))
    t = np.arange(T)[None].repeat(B, 0)
    cut = np.array([[20], [41]])[:B] if packed else np.full((B, 1), T)
    seg = jnp.asarray(np.where(t < cut, 1, 2), jnp.int32)
    pos = jnp.asarray(np.where(t < cut, t, t - cut), jnp.int32)
    return q, k, v, pos, seg


def _ours(q, k, v, pos, seg):
    return attention(q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, causal=True,
                     block_q=16, block_kv=16)


def _zeros(q, k, v, pos, seg):
    return jnp.zeros_like(q)


def test_one_document_rows():
    *_, pos, seg = _inputs()
    assert bool(one_document_rows(pos, seg))
    assert not bool(one_document_rows(pos, seg.at[0, 5:].set(2)))  # a second document
    assert not bool(one_document_rows(pos, seg.at[1, :3].set(0)))  # padding
    assert not bool(one_document_rows(pos.at[0].add(pos[0] // 10), seg))  # positions jump


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_wiring_matches_dense(packed):
    """GQA (4 query heads on 2 kv heads): one-document rows take the fused call (a zero
    fallback would show otherwise), packed rows take ours; values within 1e-5 and gradients
    within 5e-5 of dense attention, in fp32 through JAX's reference path."""
    q, k, v, pos, seg = _inputs(packed=packed)
    ref = lambda q, k, v: dense_attention(q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg)
    probe = cudnn_causal_attention(q, k, v, pos, seg, fallback=_zeros, implementation="xla")
    assert (float(jnp.abs(probe).max()) == 0.0) == packed
    ours = lambda q, k, v: cudnn_causal_attention(q, k, v, pos, seg, fallback=_ours,
                                                  implementation="xla")
    assert float(jnp.abs(ours(q, k, v) - ref(q, k, v)).max()) <= 1e-5
    do = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * do), argnums=(0, 1, 2))(q, k, v)
             for f in (ours, ref)]
    for a, b in zip(*grads):
        assert float(jnp.abs(a - b).max()) <= 5e-5


def test_cudnn_under_a_mesh_equals_one_device():
    """Per device under a data x tensor mesh (heads split), row 0 packed and row 1 one document:
    each device decides for its own row (a zero fallback shows which), and the values equal
    one device's."""
    q, k, v, pos, seg = _inputs(packed=True)
    seg, pos = seg.at[1].set(1), pos.at[1].set(jnp.arange(64))
    run = lambda *a, fallback=_ours: cudnn_causal_attention(*a, fallback=fallback,
                                                            implementation="xla")
    one = run(q, k, v, pos, seg)
    mesh = qwenjax.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    with activate(mesh):
        sharded = jax.jit(run)(q, k, v, pos, seg)
        probe = jax.jit(lambda *a: run(*a, fallback=_zeros))(q, k, v, pos, seg)
    assert float(jnp.abs(sharded - one).max()) <= 1e-6
    assert float(jnp.abs(probe[0]).max()) == 0.0  # packed row: the fallback
    assert float(jnp.abs(probe[1] - one[1]).max()) <= 1e-6  # one document: the fused call


class FakeGPU:
    """What the mesh's devices say on a GPU machine (platform and compute capability)."""

    platform = "gpu"

    def __init__(self, capability):
        self.compute_capability = capability


def test_kernel_choice_on_gpu(monkeypatch):
    from qwenjax.model import sequence_ops

    mesh = qwenjax.make_mesh({"data": 1}, jax.devices()[:1])
    with activate(mesh, platform="gpu"):
        # CPU devices lowering for GPU ahead of time: auto keeps ours, an explicit cudnn is kept
        assert attention_impl("auto", 256, 128, dtype=jnp.bfloat16) == "xla"
        assert attention_impl("cudnn", 256, 256, dtype=jnp.float16) == "cudnn"
        monkeypatch.setattr(sequence_ops, "target_device", lambda: FakeGPU("9.0"))  # H100
        assert attention_impl("auto", 256, 128, dtype=jnp.bfloat16) == "cudnn"
        assert attention_impl("auto", 256, 256, dtype=jnp.bfloat16) == "cudnn"
        assert attention_impl("auto", 256, 128, dtype=jnp.float32) == "xla"  # cuDNN: half only
        assert attention_impl("auto", 256, 128, dtype=jnp.bfloat16, ring=True) == "xla"
        with pytest.raises(ConfigError, match="head_dim 512"):
            attention_impl("cudnn", 256, 512, dtype=jnp.bfloat16)
        with pytest.raises(ConfigError, match="not inside ring attention"):
            attention_impl("cudnn", 256, 128, dtype=jnp.bfloat16, ring=True)
        monkeypatch.setattr(sequence_ops, "target_device", lambda: FakeGPU("8.0"))  # A100
        assert attention_impl("auto", 256, 128, dtype=jnp.bfloat16) == "cudnn"
        assert attention_impl("auto", 256, 256, dtype=jnp.bfloat16) == "xla"  # Qwen3.5's 256
        with pytest.raises(ConfigError, match="head_dim 256 > 128 needs compute capability >= 9.0"):
            attention_impl("cudnn", 256, 256, dtype=jnp.bfloat16)
        for other in ("7.5", "gfx90a"):  # Turing; ROCm
            monkeypatch.setattr(sequence_ops, "target_device", lambda c=other: FakeGPU(c))
            assert attention_impl("auto", 256, 64, dtype=jnp.bfloat16) == "xla"
    with pytest.raises(ConfigError, match="needs a GPU mesh, the target platform is cpu"):
        attention_impl("cudnn", 256, 128, dtype=jnp.bfloat16)


@pytest.fixture
def hopper_cudnn(monkeypatch):
    """cuDNN's checks ask the local CUDA install, ours the mesh's devices; answer as an H100
    with cuDNN 9.10 would."""
    import jax._src.cudnn.fused_attention_stablehlo as fused

    from qwenjax.model import sequence_ops

    monkeypatch.setattr(sequence_ops, "target_device", lambda: FakeGPU("9.0"))
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)


def test_train_step_lowered_for_gpu_holds_cudnn_kernels(hopper_cudnn):
    """A tiny Qwen3 in bf16 with `attention_impl: auto` on a GPU mesh: the loss gradient
    lowered for CUDA calls cuDNN's fused attention forward and backward."""
    from qwenjax.train.loss import Batch
    from qwenjax.train.step import make_loss_and_grad, split_model

    cfg = qwenjax.load_preset("qwen3-tiny").replace(num_layers=2).with_runtime(
        dtype="bfloat16")
    graphdef, params = split_model(qwenjax.init_model(cfg))
    B, T = 2, 128
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = Batch(input_ids=ids[:, :-1], targets=ids[:, 1:], loss_mask=np.ones((B, T), np.float32),
                  positions=np.arange(T, dtype=np.int32)[None].repeat(B, 0),
                  segment_ids=np.ones((B, T), np.int32))
    mesh = qwenjax.make_mesh({"data": 1}, jax.devices()[:1])
    with activate(mesh, platform="gpu"):
        step = jax.jit(make_loss_and_grad(graphdef))
        text = step.trace(params, batch).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @(__cudnn\$\w+)", text)
    assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= set(calls), set(calls)
    # the layer scan's body holds the backward once; the forward is there again under remat
    assert calls.count("__cudnn$fmhaSoftmaxBackward") == 1 and calls.count("__cudnn$fmhaSoftmax") == 2
