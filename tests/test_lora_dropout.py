"""LoRA dropout (PEFT's lora_dropout): every adapted projection computes x W + s * drop(x) A B,
with one mask per adapter and layer (shared by the kernels one A feeds, independent across
adapters and layers); a sharded step draws the same masks as one device; steps are
reproducible from the seed; experts with dropout are refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenjax.errors import ConfigError
from qwenjax.experiment import LoRAConfig, experiment_from_dict
from qwenjax.model.attention import Attention
from qwenjax.model.gated_deltanet import GatedDeltaNet
from qwenjax.model.lora import (
    SUFFIX_B,
    adapter_dropout,
    dropout_branch,
    dropout_mask,
    fold_lora,
    module_key,
)
from qwenjax.model.mlp import MLP
from qwenjax.model.partition import init_sharded
from qwenjax.sharding import activate, make_mesh
from qwenjax.train.loss import batch_from_tokens, loss_fn
from qwenjax.train.optimizer import make_optimizer
from qwenjax.train.sft_run import lora_model
from qwenjax.train.step import init_train_state, make_train_step

RATE = 0.4
TARGETS = ["q", "k", "v", "o", "in_proj_qkv", "in_proj_z", "out_proj", "gate", "up", "down"]


def _exp(dropout=RATE, **over):
    return experiment_from_dict({"model": "qwen3.5-moe-tiny", "model_overrides": {
        "num_layers": 2, "layer_types": ["linear_attention", "full_attention"]}, "lora": {
        "rank": 4, "alpha": 8.0, "dropout": dropout, "targets": TARGETS},
        "optimizer": {"lr": 1e-2, "warmup_steps": 0}, **over}, quiet=True)


def _nonzero(adapters, seed=3):
    leaves, tree = jax.tree.flatten(adapters)  # B = 0 (the init) would hide the adapter branch
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                     for k, x in zip(keys, leaves)])


def test_bad_dropout_settings_are_one_config_error():
    with pytest.raises(ConfigError, match="in \\[0, 1\\)"):
        LoRAConfig(rank=4, dropout=1.0)
    with pytest.raises(ConfigError, match="routed experts take no dropout"):
        LoRAConfig(rank=4, dropout=0.1, targets=["q", "experts"])


def _reference(x, w, a, b, scale, keep):
    """PEFT's form in NumPy (fp64): x W + scale * (drop(x) A) B over the leading dims."""
    x, w, a, b = (np.asarray(t, np.float64) for t in (x, w, a, b))
    n_in = a.ndim - 1
    dropped = np.where(np.asarray(keep), x / (1 - RATE), 0.0)
    lead = x.shape[:x.ndim - n_in]
    xin = x.reshape(*lead, -1)
    din = dropped.reshape(*lead, -1)
    w2, a2 = w.reshape(xin.shape[-1], -1), a.reshape(xin.shape[-1], -1)
    y = xin @ w2 + scale * (din @ a2) @ b.reshape(a2.shape[-1], -1)
    return y.reshape(*lead, *w.shape[n_in:])


def _check_module(m, raw, x, checked):
    """m's adapted projections under the active dropout vs PEFT's form from its unfolded
    weights `raw`; records (module type, kernel, its A) in `checked`."""

    def check(kernel, inp, got):
        b = getattr(m, kernel + SUFFIX_B)
        a_name = b.get_metadata("lora_a")
        keep = dropout_mask(module_key(m), a_name, inp.shape, RATE)
        want = _reference(inp, raw[kernel], raw[a_name], raw[kernel + SUFFIX_B],
                          b.get_metadata("scale"), keep)
        assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()
        checked.add((type(m).__name__, kernel, a_name))

    if isinstance(m, Attention):
        for name in ("q", "k", "v", "gate"):
            if hasattr(m, name + "_kernel" + SUFFIX_B):
                got = m._project(x, name)
                check(name + "_kernel", x, got - raw.get(name + "_bias", 0.0))
        o = jax.random.normal(jax.random.key(2), (*x.shape[:2], *raw["o_kernel"].shape[:2]))
        got = jnp.einsum("bthk,hkd->btd", o, m.o_kernel[...])
        check("o_kernel", o, dropout_branch(got, o, m, "o_kernel"))
    elif isinstance(m, GatedDeltaNet):
        q, k, v, z, _, _ = m._project(x, jnp.ones(x.shape[:2], bool))
        for name, got in zip("qkvz", (q, k, v, z)):
            check(name + "_kernel", x, got)
    elif isinstance(m, MLP):  # the whole SwiGLU against PEFT's form of its three projections
        def ref(n, inp):
            b = getattr(m, n + "_kernel" + SUFFIX_B)
            keep = dropout_mask(module_key(m), b.get_metadata("lora_a"), inp.shape, RATE)
            return _reference(inp, raw[n + "_kernel"], raw[b.get_metadata("lora_a")],
                              raw[n + "_kernel" + SUFFIX_B], b.get_metadata("scale"), keep)

        h = jax.nn.silu(ref("gate", x)) * ref("up", x)
        want = ref("down", h)
        assert np.abs(np.asarray(m(x)) - want).max() <= 1e-5 * np.abs(want).max()
        checked.add(("MLP", "swiglu", ""))


def _layer(stack, repeat, layer):
    """One repeat's slice of `stack`'s block, folded under dropout, and its unfolded weights."""
    g, p = nnx.split(stack.block)
    block = nnx.merge(g, jax.tree.map(lambda t: t[repeat], p))
    raw = {id(m): {n: np.asarray(v[...]) for n, v in vars(m).items() if isinstance(v, nnx.Param)}
           for _, m in nnx.iter_graph(block) if isinstance(m, nnx.Module)}
    fold_lora(block, layer=layer)
    return block, raw


def test_every_projection_is_peft_form_with_shared_and_independent_masks():
    exp = _exp(model_overrides={"num_layers": 4, "layer_types": ["linear_attention",
                                                                 "full_attention"] * 2})
    graphdef, params = init_sharded(exp.model_config(), None, None, 0)
    graphdef, adapters, (base,) = lora_model(nnx.merge(graphdef, params), exp)
    model = nnx.merge(graphdef, _nonzero(adapters), base)
    (stack,) = model.stacks
    assert stack.repeats == 2
    x = jax.random.normal(jax.random.key(1), (2, 8, model.config.hidden_size), jnp.float32)
    checked, q_keep = set(), []
    for repeat in range(2):
        with adapter_dropout(jax.random.key(7), RATE):
            block, raw = _layer(stack, repeat, layer=2 * repeat)
            modules = [m for _, m in nnx.iter_graph(block) if isinstance(m, nnx.Module)]
            for m in modules:
                _check_module(m, raw.get(id(m), {}), x, checked)
            att = next(m for m in modules if isinstance(m, Attention))
            q_keep.append(np.asarray(dropout_mask(module_key(att), "q_proj_lora_a", x.shape, RATE)))
            k_keep = np.asarray(dropout_mask(module_key(att), "k_proj_lora_a", x.shape, RATE))
            assert 0.55 <= q_keep[-1].mean() <= 0.65  # keep probability 1 - RATE
            assert (q_keep[-1] != k_keep).mean() > 0.3  # adapters draw their own masks
    assert (q_keep[0] != q_keep[1]).mean() > 0.3  # and so do layers
    kinds = {c[:2] for c in checked}
    assert {("Attention", "q_kernel"), ("Attention", "gate_kernel"), ("Attention", "o_kernel"),
            ("GatedDeltaNet", "q_kernel"), ("GatedDeltaNet", "z_kernel"),
            ("MLP", "swiglu")} <= kinds, kinds
    # Qwen3.5's q_proj feeds q and the output gate: one A, so one mask.
    assert ("Attention", "gate_kernel", "q_proj_lora_a") in checked


@pytest.mark.slow  # ~60 s on 2 shared cores: the sharded GDN + MoE gradient
def test_dropout_on_a_mesh_of_8_draws_the_same_masks_as_one_device():
    exp = _exp()
    rng = np.random.RandomState(0)
    batch = batch_from_tokens(jnp.asarray(rng.randint(0, 512, (8, 33))))

    def grads(mesh):
        graphdef, params = init_sharded(exp.model_config(), mesh, None, 0)
        graphdef, adapters, (base,) = lora_model(nnx.merge(graphdef, params), exp, mesh)
        adapters = jax.tree.map(lambda n, o: jax.device_put(n, o.sharding),
                                _nonzero(adapters), adapters)

        @jax.jit
        def f(adapters, base, batch):
            def loss(a):
                with adapter_dropout(jax.random.key(11), RATE):
                    return loss_fn(nnx.merge(graphdef, a, base), batch)[0]
            return jax.value_and_grad(loss)(adapters)

        return f(adapters, base, batch)

    l1, g1 = grads(None)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    with activate(mesh):
        l8, g8 = grads(mesh)
    assert abs(float(l1) - float(l8)) <= 1e-5
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def _losses(exp, steps=3, runs=1):
    """Losses of `steps` train steps, `runs` times from the same start (one compile)."""
    graphdef, params = init_sharded(exp.model_config(), None, None, 0)
    graphdef, adapters, frozen = lora_model(nnx.merge(graphdef, params), exp)
    tx = make_optimizer(exp.optimizer, 10, adapters)
    step = make_train_step(graphdef, tx, aux_weight=0.0, z_weight=0.0,
                           lora_dropout=exp.lora.dropout, seed=exp.seed)
    rng = np.random.RandomState(0)
    toks = jnp.asarray(rng.randint(0, 512, (8, 33)))
    batch = jax.tree.map(lambda t: t.reshape(2, 4, *t.shape[1:]), batch_from_tokens(toks))
    out = []
    for _ in range(runs):
        state, losses = init_train_state(jax.tree.map(jnp.copy, adapters), tx), []
        for _ in range(steps):
            state, metrics = step(state, batch, *frozen)
            losses.append(float(metrics["loss"]))
        out.append(losses)
    return out


def test_dropout_steps_are_reproducible_and_differ_from_no_dropout():
    exp = _exp(model_overrides={"num_layers": 1, "layer_types": ["full_attention"]})
    a, b = _losses(exp, runs=2)
    assert a == b  # the masks come from the seed, the step and the micro-batch
    (none,) = _losses(dataclasses.replace(exp, lora=dataclasses.replace(exp.lora, dropout=0.0)))
    assert abs(a[0] - none[0]) <= 1e-5  # B = 0 at the start: the branch adds nothing yet
    assert abs(a[2] - none[2]) > 1e-4  # then dropout changes what B learnt
