"""The SAE training step and a plain in-memory training loop.

State: parameters, Adam moments, per-latent tokens-since-last-fired (dead-latent tracking for
AuxK and the dead fraction), the step. Each step: gradient, projection of the decoder rows'
gradients onto their tangent space, Adam, decoder rows renormalised to unit norm.

Wide SAEs: with a mesh, the latent dimension F of W_enc, b_enc, W_dec (and the threshold, the
counters, the Adam moments) is split over the mesh's devices (`latent_shardings`); the batch is
replicated. Encoding is then local per device except the TopK selection, which GSPMD gathers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenjax.interp import sae as S


class SAEState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    since_fired: jax.Array  # [F] int32: training tokens since each latent last fired
    step: jax.Array  # int32 scalar


def lr_schedule(lr: float, steps: int, warmup: int) -> optax.Schedule:
    """Linear warmup, constant, then a linear decay to 0 over the last 20 % of steps."""
    decay = max(steps // 5, 1)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr),
         optax.linear_schedule(lr, 0.0, decay)],
        [max(warmup, 1), max(steps - decay, warmup + 1)],
    )


def make_optimizer(lr: float, steps: int, warmup: int) -> optax.GradientTransformation:
    """Adam (gradients clipped at global norm 1) on `lr_schedule`."""
    schedule = lr_schedule(lr, steps, warmup)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule, b1=0.9, b2=0.999))


def latent_shardings(params: dict, mesh: Mesh) -> dict:
    """F over every mesh axis of size > 1; everything else replicated."""
    axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1) or None
    spec = {"W_enc": PartitionSpec(None, axes), "b_enc": PartitionSpec(axes),
            "W_dec": PartitionSpec(axes, None), "b_dec": PartitionSpec(),
            "log_threshold": PartitionSpec(axes)}
    return {k: NamedSharding(mesh, spec[k]) for k in params}


def init_state(params: dict, tx, mesh: Mesh | None = None) -> SAEState:
    F = params["W_enc"].shape[1]
    since = jnp.zeros((F,), jnp.int32)
    if mesh is not None:
        shardings = latent_shardings(params, mesh)
        params = jax.device_put(params, shardings)
        since = jax.device_put(since, shardings["b_enc"])
    opt_state = jax.jit(tx.init)(params)
    return SAEState(params, opt_state, since, jnp.zeros((), jnp.int32))


def make_train_step(cfg: S.SAEConfig, tx) -> Callable:
    """(state, x [N,D]) -> (state, metrics); jitted, state donated."""

    def step(state: SAEState, x):
        dead = state.since_fired >= cfg.dead_tokens
        (_, (metrics, z)), grads = jax.value_and_grad(S.loss, argnums=1, has_aux=True)(
            cfg, state.params, x, dead)
        grads = S.project_decoder_grad(state.params, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = S.normalize_decoder(optax.apply_updates(state.params, updates))
        fired = jnp.any(z > 0, axis=0)
        since = jnp.where(fired, 0, state.since_fired + x.shape[0])
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
                   "dead_fraction": jnp.mean(since >= cfg.dead_tokens)}
        return SAEState(params, opt_state, since, state.step + 1), metrics

    return jax.jit(step, static_argnums=(), donate_argnums=(0,))


class ShuffledRows:
    """Rows of an in-memory array [N,D] in a fresh seeded order each epoch; the position is a
    JSON-able state, so a resumed run reads exactly the rows it would have."""

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int):
        if batch_size > len(rows):
            raise ValueError(f"batch of {batch_size} rows but only {len(rows)} activations")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self.pos + self.batch_size > len(self.rows):  # drop the ragged tail of an epoch
            self.epoch, self.pos = self.epoch + 1, 0
        idx = np.sort(self._order(self.epoch)[self.pos:self.pos + self.batch_size])
        self.pos += self.batch_size
        return self.rows[idx]

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "rows": len(self.rows)}

    def set_state(self, state: dict) -> None:
        if state["rows"] != len(self.rows) or state["seed"] != self.seed:
            raise ValueError(f"data state {state} is for other activations")
        self.epoch, self.pos = state["epoch"], state["pos"]


def train_in_memory(
    cfg: S.SAEConfig, rows: np.ndarray, *, steps: int, batch_size: int, lr: float,
    seed: int = 0, warmup: int = 0, mesh: Mesh | None = None,
) -> tuple[dict, dict]:  # fmt: skip
    """Train an SAE on activations rows [N,D] -> (params, last metrics). For small runs and
    tests; `qwenjax sae train` (run.py) adds checkpoints, metrics and evaluation."""
    cfg = cfg.resolved(rows.shape[1])
    params = S.init_params(cfg, jax.random.key(seed), rows[: min(len(rows), 4096)])
    tx = make_optimizer(lr, steps, warmup)
    state = init_state(params, tx, mesh)
    step = make_train_step(cfg, tx)
    metrics = {}
    for x in _take(ShuffledRows(rows, batch_size, seed), steps):
        state, metrics = step(state, jnp.asarray(x))
    return state.params, {k: float(v) for k, v in metrics.items()}


def _take(it, n):
    for _ in range(n):
        yield next(it)
