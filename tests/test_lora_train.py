"""LoRA training: the frozen base is bit-identical after training and has no optimizer state,
adapters are fp32 over a bf16 base, a mesh of 8 trains as one device, and a LoRA SFT run from
the command line writes a PEFT adapter that exports again from the run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenjax.experiment import experiment_from_dict
from qwenjax.model.lora import LoRAParam
from qwenjax.model.partition import init_sharded
from qwenjax.sharding import activate, make_mesh
from qwenjax.train.lora import merge_adapters
from qwenjax.train.loss import batch_from_tokens, loss_fn
from qwenjax.train.optimizer import make_optimizer
from qwenjax.train.sft_run import lora_model
from qwenjax.train.step import batch_sharding, init_train_state, make_train_step

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q", "o", "in_proj_qkv", "out_proj", "gate", "experts"]  # attention, GDN, MoE, shared


def _exp(**over):
    return experiment_from_dict({"model": "qwen3.5-moe-tiny", "model_overrides": {
        "num_layers": 2, "layer_types": ["linear_attention", "full_attention"]}, "lora": {
        "rank": 4, "alpha": 8.0, "targets": TARGETS}, "optimizer": {"lr": 1e-2, "warmup_steps": 0},
        **over}, quiet=True)


def _batches(n, B=8, T=32):
    rng = np.random.RandomState(0)
    start, stride = rng.randint(0, 512, (n, B, 1)), rng.randint(1, 4, (n, B, 1))
    toks = (start + stride * np.arange(T + 1)) % 512  # a learnable rule
    toks[1:] = toks[0]  # one batch again and again: a few steps must fit it
    return [jax.tree.map(lambda x: x[None], batch_from_tokens(jnp.asarray(t))) for t in toks]


def _train(exp, mesh, steps=3):
    cfg = exp.model_config()
    graphdef, params = init_sharded(cfg, mesh, None, 0)
    graphdef, adapters, frozen = lora_model(nnx.merge(graphdef, params), exp, mesh)
    tx = make_optimizer(exp.optimizer, 10, adapters)
    state = init_train_state(adapters, tx)
    kw = {}
    if mesh is not None:
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
                             else jax.device_put(x, rep), state)
        kw = {"state_sharding": jax.tree.map(lambda x: x.sharding, state),
                  "batch_sharding": batch_sharding(mesh, None),
                  "frozen_sharding": jax.tree.map(lambda x: x.sharding, frozen[0])}
    step = make_train_step(graphdef, tx, aux_weight=0.0, z_weight=0.0, **kw)
    base_before = jax.tree.map(np.asarray, frozen[0])
    losses = []
    for batch in _batches(steps):
        if mesh is not None:
            batch = jax.device_put(batch, kw["batch_sharding"])
        state, metrics = step(state, batch, *frozen)
        losses.append(float(metrics["loss"]))
    return state, frozen[0], base_before, losses


def test_frozen_base_bit_identical_adapters_fp32_over_bf16_base():
    exp = _exp(runtime={"param_dtype": "bfloat16"})
    state, base, before, losses = _train(exp, None, steps=4)
    assert losses[-1] < losses[0] - 0.05  # the adapters learn
    after = jax.tree.map(np.asarray, base)
    same = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), before, after)
    assert all(jax.tree.leaves(same))
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    # Optimizer state only for the adapters: Adam's two moments, nothing the size of the base.
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    n_base = sum(x.size for x in jax.tree.leaves(base))
    assert n_opt == 2 * n_adapter and n_adapter < n_base / 5
    names = {str(p[-1]) for p, _ in nnx.to_flat_state(state.params)}
    assert {"experts_gate_proj_lora_a", "in_proj_qkv_lora_a", "q_proj_lora_a"} <= names


@pytest.mark.slow  # ~70-100 s on 2 shared cores: compiling the sharded GDN + MoE gradient
def test_lora_on_a_mesh_of_8_equals_one_device():
    """Loss and adapter gradients (the contract for sharded training: <= 1e-5, relative for
    gradients), with non-zero adapters on attention, GDN, shared-expert and expert weights."""
    exp = _exp()
    batch = jax.tree.map(lambda x: x[0], _batches(1)[0])

    def grads(mesh):
        graphdef, params = init_sharded(exp.model_config(), mesh, None, 0)
        graphdef, adapters, (base,) = lora_model(nnx.merge(graphdef, params), exp, mesh)
        leaves, tree = jax.tree.flatten(adapters)  # non-zero B: B = 0 would zero A's gradient
        keys = jax.random.split(jax.random.key(3), len(leaves))
        adapters = jax.tree.unflatten(tree, [
            jax.device_put(x + 0.1 * jax.random.normal(k, x.shape), x.sharding)
            for k, x in zip(keys, leaves)])

        @jax.jit
        def f(adapters, base, batch):
            return jax.value_and_grad(
                lambda a: loss_fn(nnx.merge(graphdef, a, base), batch)[0])(adapters)

        return f(adapters, base, batch)

    l1, g1 = grads(None)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    with activate(mesh):
        l8, g8 = grads(mesh)
    assert abs(float(l1) - float(l8)) <= 1e-5
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_lora_sft_run_from_the_command_line(tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{i}+{i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(40)]
    rows.append({"messages": [{"role": "user", "content": "long " * 40},
                              {"role": "assistant", "content": "x"}]})
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cli = [sys.executable, "-m", "qwenjax.cli"]
    sets = ["data.source=sft", f"data.paths=[{data}]", "data.overlong=drop", "lora.rank=4",
            "lora.targets=[q,v,o,experts]", "steps=4", "log_every=2", "tokenizer.train_docs=41",
            "sample_tokens=0"]
    r = subprocess.run(cli + ["train", str(ROOT / "experiments/tiny_test.yaml"), "--run-dir",
                              str(run)] + [a for s in sets for a in ("--set", s)],
                       capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["sft_dropped"] == 1 and metrics[-1]["sft_examples"] == 40
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    r = subprocess.run(cli + ["export-hf", str(run), str(tmp_path / "ad"), "--adapter"],
                       capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.numpy import load_file

    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)  # trained
    r = subprocess.run(cli + ["export-hf", str(tmp_path / "nothing"), str(tmp_path / "m"),
                              "--merge"], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 2 and "not a training run directory" in r.stderr.splitlines()[-1]


def test_merging_expert_and_gdn_adapters_keeps_the_logits():
    exp = _exp()
    graphdef, params = init_sharded(exp.model_config(), None, None, 0)
    graphdef, adapters, (base,) = lora_model(nnx.merge(graphdef, params), exp)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    adapters = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                         for k, x in zip(keys, leaves)])
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 512, (2, 16)))
    forward = jax.jit(lambda a: nnx.merge(graphdef, a, base)(ids))  # one compile, two calls
    adapted = np.asarray(forward(adapters))
    assert np.abs(adapted - np.asarray(forward(jax.tree.map(jnp.zeros_like, adapters)))).max() > 1e-2
    model = nnx.merge(graphdef, adapters, base)
    merge_adapters(model)
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.iter_graph(model))
    merged_graph, merged_params = nnx.split(model)
    merged = jax.jit(lambda p: nnx.merge(merged_graph, p)(ids))(merged_params)
    np.testing.assert_allclose(np.asarray(merged), adapted, atol=1e-5, rtol=0)
