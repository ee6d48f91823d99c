"""Compile (never run) an experiment's programs for a device mesh: the training step and, for
`--infer`, prefill and one decode step. Nothing is allocated: parameters, optimizer state, batch
and cache are abstract (`jax.ShapeDtypeStruct` with their shardings), so a 235B-parameter step
compiles on a laptop. The step is the real one (`train.step.make_train_step`: loss, grads with
micro-batch accumulation, the experiment's optimizer, non-finite skip); inference uses the
jitted pieces `qwenjax generate` runs (`infer.generate._prefill` / `_step`).

Tracing and compiling happen under `sharding.activate(mesh, ...)`, so kernel choices read the
mesh's platform: over compile-only TPU devices (`plan/chips.py`) that is "tpu", whatever the
host is.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenjax.config import ModelConfig
from qwenjax.experiment import ExperimentConfig
from qwenjax.model.lora import LoRAParam
from qwenjax.model.partition import abstract_model, variable_sharding
from qwenjax.sharding import activate, logical_to_spec
from qwenjax.train.loss import Batch
from qwenjax.train.optimizer import make_optimizer
from qwenjax.train.step import TrainState, batch_sharding, make_train_step


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_params(cfg: ModelConfig, mesh: Mesh, rules: dict):
    """(graphdef, params): every parameter a ShapeDtypeStruct in its sharding."""
    graphdef, abstract = abstract_model(cfg)

    def place(var):
        value = var.get_value()
        sharding = variable_sharding(var, mesh, rules)
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    return graphdef, jax.tree.map(place, abstract, is_leaf=_is_var)


def abstract_lora_params(exp: ExperimentConfig, cfg: ModelConfig, mesh: Mesh, rules: dict):
    """(graphdef, adapters, base) of a LoRA run, abstract and placed like `abstract_params`."""
    from qwenjax.model.transformer import CausalLM
    from qwenjax.train.lora import add_adapters

    def build():
        model = CausalLM(cfg, rngs=nnx.Rngs(0))
        add_adapters(model, exp.lora, exp.seed)
        return model

    graphdef, adapters, base = nnx.split(nnx.eval_shape(build), LoRAParam, ...)

    def place(var):
        value = var.get_value()
        sharding = variable_sharding(var, mesh, rules)
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    adapters, base = (jax.tree.map(place, s, is_leaf=_is_var) for s in (adapters, base))
    return graphdef, adapters, base


def abstract_train_state(exp: ExperimentConfig, cfg: ModelConfig, mesh: Mesh, rules: dict):
    """(graphdef, tx, state) as `train.loop` builds them, abstract: optimizer subtrees shaped
    like the parameters (AdamW's moments) take their shardings, scalars are replicated. A LoRA
    run's state holds the adapters (its frozen base: `abstract_lora_params`)."""
    if exp.lora.rank:
        graphdef, params, _ = abstract_lora_params(exp, cfg, mesh, rules)
    else:
        graphdef, params = abstract_params(cfg, mesh, rules)
    tx = make_optimizer(exp.optimizer, exp.steps, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_tree = jax.tree.structure(params)
    like_params = lambda n: jax.tree.structure(n) == param_tree

    def place(node):
        if like_params(node):
            return jax.tree.map(
                lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding),
                node, params,
            )
        return jax.ShapeDtypeStruct(node.shape, node.dtype, sharding=replicated)

    opt_state = jax.tree.map(place, jax.eval_shape(tx.init, params), is_leaf=like_params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return graphdef, tx, TrainState(params, opt_state, scalar, scalar, scalar)


def lower_train_step(exp: ExperimentConfig, cfg: ModelConfig, mesh: Mesh, rules: dict):
    """-> (lowered step, abstract state). Batch: exp.batch_size rows of exp.data.seq_len tokens
    in exp.grad_accum micro-batches."""
    graphdef, tx, state = abstract_train_state(exp, cfg, mesh, rules)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    sharding = batch_sharding(mesh, rules)
    A, T = exp.grad_accum, exp.data.seq_len
    shape = (A, exp.batch_size // A, T)
    batch = Batch(*(jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
                    for dt in (jnp.int32, jnp.int32, jnp.float32, jnp.int32, jnp.int32)))
    if exp.mtp.depth:  # multi-token prediction: per-depth inputs, targets, masks [A, B/A, T, D]
        mtp = (*shape, exp.mtp.depth)
        batch = batch._replace(**{k: jax.ShapeDtypeStruct(mtp, dt, sharding=sharding) for k, dt in
                                  (("mtp_inputs", jnp.int32), ("mtp_targets", jnp.int32),
                                   ("mtp_mask", jnp.float32))})
    frozen = ()
    if exp.lora.rank:
        frozen = (abstract_lora_params(exp, cfg, mesh, rules)[2],)
    step = make_train_step(
        graphdef, tx, aux_weight=exp.aux_loss_weight, z_weight=exp.z_loss_weight,
        mtp_weight=exp.mtp.weight if exp.mtp.depth else 0.0,
        state_sharding=state_sharding, batch_sharding=sharding,
        frozen_sharding=jax.tree.map(lambda x: x.sharding, frozen[0]) if frozen else None,
        lora_dropout=exp.lora.dropout if exp.lora.rank else 0.0, seed=exp.seed,
    )
    with activate(mesh, exp.mesh.rules, exp.mesh.context_layout, exp.runtime.platform):
        return step.lower(state, batch, *frozen), state


def compile_lowered(lowered, mesh: Mesh, exp: ExperimentConfig):
    with activate(mesh, exp.mesh.rules, exp.mesh.context_layout, exp.runtime.platform):
        return lowered.compile()


# ---- inference ------------------------------------------------------------------------------

NEW_TOKENS = 32  # decode room the planned cache keeps beyond the prompt


def lower_infer(exp: ExperimentConfig, cfg: ModelConfig, mesh: Mesh, rules: dict, length: int):
    """-> {"prefill": lowered, "decode": lowered} for a batch of exp.eval.batch_size prompts of
    `length` tokens, as `qwenjax generate` / `qwenjax eval` run them (greedy)."""
    from qwenjax.infer.cache import context_multiple
    from qwenjax.infer.generate import _prefill, _step
    from qwenjax.infer.sampling import Sampling

    graphdef, params = abstract_params(cfg, mesh, rules)
    B = exp.eval.batch_size
    batch_axes = logical_to_spec(("batch",), rules, mesh)[0]
    ways = math.prod(mesh.shape[a] for a in _names(batch_axes))
    rows = NamedSharding(mesh, PartitionSpec(batch_axes if B % ways == 0 else None))
    replicated = NamedSharding(mesh, PartitionSpec())
    with activate(mesh, exp.mesh.rules, exp.mesh.context_layout, exp.runtime.platform):
        multiple = context_multiple()
        unit = math.lcm(16, multiple)
        P = -(-length // unit) * unit
        chunk = P if multiple > 1 else min(512, P) if P % min(512, P) == 0 else 16
        slots = -(-(P + NEW_TOKENS) // multiple) * multiple
        tokens = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=rows)
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
        sampling = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
            jax.eval_shape(lambda: Sampling(0.0, 0, 1.0).arrays()),
        )
        prefill = _prefill.lower(graphdef, params, tokens, tokens, tokens, key, sampling,
                                 slots=slots, chunk=chunk, greedy=True)
        _, cache = prefill.out_info
        one = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rows)
        cache = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), cache
        )
        decode = _step.lower(graphdef, params, cache, one, one, key, sampling, greedy=True)
    return {"prefill": prefill, "decode": decode, "prompt_len": P, "slots": slots}


def _names(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
