"""Parameter checkpoints in Orbax: what `qwenjax import-hf` writes and a training run starts from.

Layout of a parameter checkpoint directory:
    model_config.json   the ModelConfig (architecture + dtypes + carried HF keys)
    params/             Orbax StandardCheckpointer tree of the nnx.Param state (pure dict)
    passthrough.safetensors   HF tensors carried unchanged (mtp.*, model.visual.*), if any
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
from qwenjax.hf.safetensors_io import PlannedTensor, read_header, read_tensor, write_shard
from qwenjax.model.partition import abstract_model, variable_sharding
from qwenjax.model.transformer import CausalLM

CONFIG_FILE = "model_config.json"
PASSTHROUGH_FILE = "passthrough.safetensors"


def save_params(model: CausalLM, ckpt_dir: str | os.PathLike) -> Path:
    ckpt_dir = Path(ckpt_dir)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    carried = getattr(model, "hf_passthrough", ())
    with atomic_dir(ckpt_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
        if carried:  # tensors carried through unchanged (mtp.*, model.visual.*), streamed
            write_shard(tmp / PASSTHROUGH_FILE,
                        [PlannedTensor(i.name, i.shape, i.dtype) for i in carried],
                        (read_tensor(i) for i in carried))
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
    graphdef, state = abstract_model(cfg)

    def abstract(var: nnx.Variable):
        value = var.get_value()
        sharding = variable_sharding(var, mesh, rules)
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)

    flat = nnx.to_flat_state(state)
    target = nnx.to_pure_dict(nnx.from_flat_state([(p, v.replace(abstract(v))) for p, v in flat]))
    path = ckpt_dir.resolve() / "params"
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: no params/ directory")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path, target)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a damaged directory
        raise CheckpointError(f"{path}: cannot restore parameters ({type(e).__name__}: {e})") from None
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    carried = ckpt_dir / PASSTHROUGH_FILE
    model.hf_passthrough = (
        tuple(sorted(read_header(carried)[0].values(), key=lambda i: i.name)) if carried.exists() else ()
    )
    return model


# ---- training-run checkpoints -------------------------------------------------------------------


class RunCheckpointer:
    """Orbax CheckpointManager for a training run: the TrainState (params, optimizer, counters)
    and the data iterator's JSON state, saved together per step, asynchronously.

    Orbax writes each step to a temporary directory and renames it when complete, so a save
    interrupted by a kill never appears as a step. A step that is complete but damaged (e.g. a
    truncated file) fails to restore; `restore_latest` then falls back to the next older step and
    says so.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            # A save killed in flight leaves `N.orbax-checkpoint-tmp-*`; never loaded, so remove
            # it when the next run opens the directory.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_pure(state)), data=ocp.args.JsonSave(data_state)
        )
        self.manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state, log=print):
        """(step, state, data_state) of the newest step that restores, or None if there is none."""
        target = _to_pure(abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
                log(f"warning: checkpoint step {step} cannot be restored "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying an older one")
                continue
            return step, _from_pure(abstract_state, restored["state"]), dict(restored["data"])
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _to_pure(tree):
    """nnx.State containers -> plain dicts (what Orbax's tree handler expects)."""
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_to_pure(x) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_to_pure(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _to_pure(v) for k, v in tree.items()}
    return tree


def _from_pure(template, pure):
    """Put restored plain dicts back into the nnx.State containers of `template`."""
    if isinstance(template, nnx.State):
        state = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(state, pure)
        return state
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*(_from_pure(t, p) for t, p in zip(template, pure)))
    if isinstance(template, (tuple, list)):
        return type(template)(_from_pure(t, p) for t, p in zip(template, pure))
    if isinstance(template, dict):
        return {k: _from_pure(template[k], pure[k]) for k in template}
    return pure
