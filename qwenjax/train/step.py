"""Jitted pure functions over a split model: forward, loss + gradients, and the train step.

`nnx.jit` walks the module graph in Python on every call; splitting once and jitting functions
of the parameter pytree costs nothing per call. The train step runs gradient accumulation as a
`lax.scan` over micro-batches, normalising by the whole batch's token count so that A
micro-batches of B/A rows give the same update as one batch of B. A step whose loss or gradient
norm is not finite leaves parameters and optimizer state untouched and is counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenjax.model.lora import adapter_dropout
from qwenjax.model.transformer import CausalLM
from qwenjax.sharding import logical_to_spec
from qwenjax.train.loss import Batch, loss_fn


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32: optimizer steps taken (skipped steps included)
    bad_steps: jax.Array  # int32: consecutive non-finite steps
    skipped: jax.Array  # int32: non-finite steps in the whole run


def batch_sharding(mesh: Mesh, rules: dict | None) -> NamedSharding:
    """[A, B/A, T] micro-batches: rows over the batch axes, tokens over `context`."""
    length = "context" if mesh.shape["context"] > 1 else None
    return NamedSharding(mesh, PartitionSpec(None, logical_to_spec(("batch",), rules, mesh)[0],
                                             length))  # fmt: skip


def split_model(model: CausalLM):
    """(graphdef, params): the static structure and the parameter pytree."""
    return nnx.split(model)


def make_forward(graphdef) -> Callable:
    """jitted (params, input_ids) -> logits [B,T,V] fp32."""

    @jax.jit
    def forward(params, input_ids):
        return nnx.merge(graphdef, params)(input_ids)

    return forward


def make_loss_and_grad(graphdef, *, aux_weight: float = 0.0, z_weight: float = 0.0,
                       mtp_weight: float = 0.0) -> Callable:
    """jitted (params, batch) -> ((loss, metrics), grads), grads shaped like params."""

    def objective(params, batch: Batch):
        return loss_fn(nnx.merge(graphdef, params), batch, aux_weight=aux_weight, z_weight=z_weight,
                       mtp_weight=mtp_weight)

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


def init_train_state(params, tx: optax.GradientTransformation) -> TrainState:
    # Three separate buffers: the step donates the state, and a buffer may be donated once.
    zeros = [jax.device_put(np.zeros((), np.int32)) for _ in range(3)]
    return TrainState(params, tx.init(params), *zeros)


def make_train_step(
    graphdef, tx: optax.GradientTransformation, *, aux_weight: float, z_weight: float,
    mtp_weight: float = 0.0, state_sharding=None, batch_sharding=None, frozen_sharding=None,
    lora_dropout: float = 0.0, seed: int = 0,
) -> Callable:
    """jitted, donating (state, batch) -> (state, metrics). `batch` fields are [A, B/A, T]
    (the `mtp_*` fields [A, B/A, T, depth] when training multi-token prediction).

    With `frozen_sharding` (LoRA: the base parameters' shardings) the step is
    (state, batch, frozen) -> (state, metrics): `state.params` are what trains (the adapters)
    and `frozen` the rest of the model, read but never differentiated nor updated.
    `lora_dropout` > 0 drops adapter inputs (model/lora.py), keyed by `seed`, the step and the
    micro-batch, so a resumed run draws the same masks."""

    def objective(params, micro: Batch, norms, n_micro, frozen=(), key=None):
        with adapter_dropout(key, lora_dropout):
            total, metrics = loss_fn(
                nnx.merge(graphdef, params, *frozen), micro, aux_weight=aux_weight / n_micro,
                z_weight=z_weight / n_micro, token_norm=norms[0], mtp_weight=mtp_weight,
                mtp_norm=norms[1],
            )
        return total, metrics

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def step(state: TrainState, batch: Batch, *frozen):
        n_micro = batch.input_ids.shape[0]
        token_norm = jnp.sum(batch.loss_mask)
        # Each MTP depth's loss is normalised by that depth's count over the whole batch.
        mtp_norm = None if batch.mtp_mask is None else jnp.sum(batch.mtp_mask, axis=(0, 1, 2))
        norms = (token_norm, mtp_norm)

        step_key = jax.random.fold_in(jax.random.key(seed), state.step)

        def accumulate(acc, xs):
            micro, index = xs
            key = jax.random.fold_in(step_key, index)
            (total, metrics), grads = grad_fn(state.params, micro, norms, n_micro, frozen, key)
            return jax.tree.map(jnp.add, acc, (total, metrics, grads)), None

        zeros = jax.tree.map(
            jnp.zeros_like,
            jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], batch),
                                           norms, n_micro, frozen, step_key)),
        )
        zeros = (zeros[0][0], zeros[0][1], zeros[1])
        micro_index = jnp.arange(n_micro, dtype=jnp.int32)
        (total, metrics, grads), _ = jax.lax.scan(accumulate, zeros, (batch, micro_index))
        metrics = dict(metrics)
        for k in ("aux_loss", "z_loss", "expert_load_max", "expert_load_min", "dropped_fraction"):
            metrics[k] = metrics[k] / n_micro
        metrics["tokens"] = token_norm
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_state = TrainState(
                params=keep(params, state.params),
                opt_state=keep(opt_state, state.opt_state),
                step=state.step + 1,
                bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
                skipped=state.skipped + (~finite).astype(jnp.int32),
            )
        metrics.update(total_loss=total, grad_norm=grad_norm, finite=finite,
                       bad_steps=new_state.bad_steps)  # outside the donated state: readable later
        return new_state, metrics

    shardings = {}
    if state_sharding is not None:
        frozen = () if frozen_sharding is None else (frozen_sharding,)
        shardings = {"in_shardings": (state_sharding, batch_sharding, *frozen),
                     "out_shardings": (state_sharding, None)}
    return jax.jit(step, donate_argnums=0, **shardings)
