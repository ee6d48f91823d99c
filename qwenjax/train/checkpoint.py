"""Parameter checkpoints in Orbax: what `qwenjax import-hf` writes and a training run starts from.

Layout of a parameter checkpoint directory:
    model_config.json   the ModelConfig (architecture + dtypes + carried HF keys)
    params/             Orbax StandardCheckpointer tree of the nnx.Param state (pure dict)
Restoring places every array straight into its sharding on the given mesh.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from qwenjax.atomic import atomic_dir
from qwenjax.config import ModelConfig
from qwenjax.errors import CheckpointError, ConfigError
from qwenjax.model.transformer import CausalLM
from qwenjax.sharding import named_sharding

CONFIG_FILE = "model_config.json"


def save_params(model: CausalLM, ckpt_dir: str | os.PathLike) -> Path:
    ckpt_dir = Path(ckpt_dir)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with atomic_dir(ckpt_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp.resolve() / "params", state)
            ckptr.wait_until_finished()
    return ckpt_dir


def read_model_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: not a qwenjax parameter checkpoint (no {CONFIG_FILE})")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()), source=str(path))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_params(
    ckpt_dir: str | os.PathLike, *, mesh: Mesh | None = None, rules: dict | None = None,
    dtype: str | None = None,
) -> CausalLM:
    """Restore a model from a parameter checkpoint, each array into its sharding."""
    ckpt_dir = Path(ckpt_dir)
    cfg = read_model_config(ckpt_dir)
    if dtype:
        cfg = cfg.replace(dtype=dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))

    def abstract(var: nnx.Variable):
        value = var.get_value()
        if mesh is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = named_sharding(mesh, var.get_metadata("axes"), value.shape, rules)
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)

    flat = nnx.to_flat_state(state)
    target = nnx.to_pure_dict(nnx.from_flat_state([(p, v.replace(abstract(v))) for p, v in flat]))
    path = ckpt_dir.resolve() / "params"
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: no params/ directory")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path, target)
    except Exception as e:  # orbax raises many kinds for a damaged directory
        raise CheckpointError(f"{path}: cannot restore parameters ({type(e).__name__}: {e})") from None
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
