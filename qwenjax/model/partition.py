"""Placing model parameters on a mesh: per-variable shardings and sharded initialisation.

Parameters carry logical axis names (`axes` metadata); `sharding.py` turns them into mesh axes.
`init_sharded` creates every parameter directly in its sharding (a jitted init with
`out_shardings`), so no device ever holds a parameter its sharding says it should not.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from qwenjax.config import ModelConfig
from qwenjax.model.transformer import CausalLM
from qwenjax.sharding import named_sharding


def variable_sharding(var: nnx.Variable, mesh: Mesh | None, rules: dict | None = None):
    shape = var.get_value().shape
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return named_sharding(mesh, var.get_metadata("axes"), shape, rules)


def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract state) without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))


def state_shardings(state, mesh: Mesh | None, rules: dict | None = None):
    """A pytree of shardings matching an (abstract) parameter state."""
    return jax.tree.map(
        lambda v: variable_sharding(v, mesh, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def init_sharded(cfg: ModelConfig, mesh: Mesh | None, rules: dict | None = None, seed: int = 0):
    """(graphdef, params) with each parameter created in its own sharding."""
    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh, rules)

    @jax.jit
    def create():
        return nnx.split(CausalLM(cfg, rngs=nnx.Rngs(seed)))[1]

    params = jax.jit(create, out_shardings=shardings)()
    return graphdef, params
