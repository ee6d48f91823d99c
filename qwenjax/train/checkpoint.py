"""Parameter checkpoints in Orbax: what `qwenjax import-hf` writes and a training run starts from.

Layout of a parameter checkpoint directory:
    model_config.json   the ModelConfig (architecture + dtypes + carried HF keys)
    params/             Orbax StandardCheckpointer tree of the nnx.Param state (pure dict)
    passthrough.safetensors   HF tensors carried unchanged (model.visual.*), if any
Restoring places every array straight into its sharding on the given mesh.
"""

from __future__ import annotations

import contextlib
import json
import logging as pylogging
import os
import sys
import time
import traceback
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from qwenjax.atomic import output_dir
from qwenjax.atomic_remote import check_complete
from qwenjax.config import ModelConfig
from qwenjax.errors import CheckpointError, ConfigError
from qwenjax.hf.safetensors_io import PlannedTensor, read_header, read_tensor, write_shard
from qwenjax.model.partition import abstract_model, variable_sharding
from qwenjax.model.transformer import CausalLM
from qwenjax.paths import absolute, as_path, copy_file, is_url, move
from qwenjax.runtime import RUNTIME_KEYS, RuntimeConfig

CONFIG_FILE = "model_config.json"
PASSTHROUGH_FILE = "passthrough.safetensors"


def save_params(
    model: CausalLM, ckpt_dir: str | os.PathLike, *, overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (), extra_files: Sequence[str | os.PathLike] = (),
) -> epath.Path:
    """Write a parameter checkpoint (`qwenjax.atomic.output_dir` rules, kind "params"): a
    non-empty directory that is not a previous parameter checkpoint is refused unless
    `overwrite`; the output may not be or contain `inputs` or the carried tensors' files.
    `extra_files` (the source's tokenizer files) are copied in beside model_config.json."""
    ckpt_dir = as_path(ckpt_dir)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    carried = getattr(model, "hf_passthrough", ())
    carried_dirs = sorted({str(as_path(i.file).parent) for i in carried})
    with output_dir(ckpt_dir, "params", overwrite=overwrite,
                    inputs=[*inputs, *carried_dirs]) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
        for path in extra_files:
            copy_file(path, tmp / as_path(path).name)
        if carried:  # tensors carried through unchanged (model.visual.*), streamed
            write_shard(tmp / PASSTHROUGH_FILE,
                        [PlannedTensor(i.name, i.shape, i.dtype) for i in carried],
                        (read_tensor(i) for i in carried))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp.resolve() / "params", state)
            ckptr.wait_until_finished()
    return ckpt_dir


def read_model_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    if is_url(ckpt_dir):  # no rename on object storage: an unfinished write is refused here
        check_complete(ckpt_dir)
    path = as_path(ckpt_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: not a qwenjax parameter checkpoint (no {CONFIG_FILE})")
    try:
        arch = json.loads(path.read_text())
        if not isinstance(arch, dict):
            raise ConfigError("expected a JSON object")
        # Checkpoints written before the runtime split also hold dtype, remat, ...: not ours to keep.
        arch = {k: v for k, v in arch.items() if k not in RUNTIME_KEYS}
        return ModelConfig.from_dict(arch, source=str(path))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_params(
    ckpt_dir: str | os.PathLike, *, mesh: Mesh | None = None, rules: dict | None = None,
    runtime: RuntimeConfig | None = None, stored_dtype: bool = False,
) -> CausalLM:
    """Restore a model from a parameter checkpoint, each array into its sharding, to run with
    `runtime` (default RuntimeConfig()); arrays are restored in its param_dtype, or, with
    `stored_dtype` or no runtime given, in the dtype the checkpoint was stored in."""
    ckpt_dir = as_path(ckpt_dir)
    cfg = read_model_config(ckpt_dir)
    path = absolute(ckpt_dir) / "params"
    if not path.exists():
        raise CheckpointError(f"{ckpt_dir}: no params/ directory")
    if stored_dtype or runtime is None:
        runtime = (runtime or RuntimeConfig()).replace(param_dtype=_stored_dtype_at(path))
    cfg = cfg.replace(runtime=runtime)
    graphdef, state = abstract_model(cfg)

    def abstract(var: nnx.Variable):
        value = var.get_value()
        sharding = variable_sharding(var, mesh, rules)
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)

    flat = nnx.to_flat_state(state)
    target = nnx.to_pure_dict(nnx.from_flat_state([(p, v.replace(abstract(v))) for p, v in flat]))
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


def _stored_dtype_at(path: os.PathLike) -> str:
    """The dtype a parameter checkpoint's arrays were written in (the most common one)."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(path)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a damaged directory
        raise CheckpointError(f"{path}: cannot read the checkpoint's metadata ({e})") from None
    leaves = jax.tree.leaves(getattr(meta, "item_metadata", meta))
    names = [np.dtype(x.dtype).name for x in leaves if getattr(x, "dtype", None) is not None]
    return max(set(names), key=names.count) if names else "float32"


# ---- training-run checkpoints -------------------------------------------------------------------


class RunCheckpointer:
    """Orbax CheckpointManager for a training run: the TrainState (params, optimizer, counters)
    and the data iterator's JSON state, saved together per step, asynchronously.

    Orbax writes each step to a temporary directory and renames it when complete, so a save
    interrupted by a kill never appears as a step. A step that is complete but damaged (e.g. a
    truncated file, a missing item) fails to restore: `restore_latest` moves it aside to
    `damaged/<step>-<time>` (kept, not deleted; one warning line) and tries the next older one,
    so the run can save that step number again.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool):
        self.directory = absolute(directory)
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
        """(step, state, data_state) of the newest step that restores, or None if there is none.
        Every step that fails on any process is moved aside (by process 0) with one warning."""
        target = _to_pure(abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            reason = None
            try:
                with quiet_orbax():
                    restored = self.manager.restore(
                        step, args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                        ),
                    )
            except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
                if not _looks_damaged(e):  # out of memory, no permission: the step may be fine
                    raise CheckpointError(
                        f"{self.directory}/{step} could not be restored and was left in place: "
                        f"{type(e).__name__}: {_first_line(e)}"
                    ) from None
                reason = f"{type(e).__name__}: {_first_line(e)}"
            if _everyone(reason is None):
                return step, _from_pure(abstract_state, restored["state"]), dict(restored["data"])
            moved = self._set_aside(step)
            reason = reason or "on another host"
            log(f"warning: checkpoint step {step} cannot be restored ({reason}); moved to {moved}, "
                "trying an older one")
        return None

    def _set_aside(self, step: int):
        """Rename the step's directory to damaged/<step>-<UTC time> (process 0 does it)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.directory / "damaged" / f"{step}-{stamp}"
        failed = ""
        if jax.process_index() == 0:
            try:
                dest.parent.mkdir(exist_ok=True)
                n = 1
                while dest.exists():
                    n += 1
                    dest = dest.with_name(f"{step}-{stamp}-{n}")
                move(self.directory / str(step), dest)
            except OSError as e:
                failed = e.strerror or str(e)
        # every host learns whether process 0 managed (no host waits on one that gave up)
        if not _everyone(not failed):
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be restored nor moved aside"
                f"{': ' + failed if failed else ' (on process 0)'}"
            )
        self.manager.reload()  # forget the step, so saving that number again is a new save
        return dest

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_params_shapes(directory: str | os.PathLike) -> dict[str, tuple] | None:
    """{parameter path: (shape, dtype)} in the newest step of a run's checkpoints whose
    metadata reads, or None if none does. Metadata only, no arrays."""
    directory = absolute(directory)
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
    for step in steps:
        try:
            with quiet_orbax(), ocp.PyTreeCheckpointer() as ckptr:
                params = ckptr.metadata(directory / str(step) / "state").item_metadata["params"]
        except Exception:  # noqa: BLE001, S112 - unreadable metadata: try an older step
            continue
        return tree_shapes(params)
    return None


def tree_shapes(tree) -> dict[str, tuple]:
    """{"a/0/b": (shape, dtype name)} of a tree of arrays, abstract arrays or array metadata.
    Keys as strings: Orbax metadata spells the integer keys of nnx state as "0"."""
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
            (tuple(x.shape), str(np.dtype(x.dtype)))
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:160] if str(e) else ""


def _looks_damaged(e: BaseException) -> bool:
    """A restore failure that says the step's files are bad, not that this machine could not
    read them now (out of memory, permissions): only the former moves a step aside."""
    if isinstance(e, (MemoryError, PermissionError)):
        return False
    text = str(e)
    return not any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "Permission denied"))


def _everyone(ok: bool) -> bool:
    """True only if `ok` on every process (one host failing to read its shards fails all)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
    return bool(np.asarray(flags).all())


_quiet_hook_installed = False


@contextlib.contextmanager
def quiet_orbax():
    """Silence what a failed Orbax restore prints besides its exception: absl/orbax log lines,
    and the tracebacks of TensorStore callbacks that reach the closed asyncio loop afterwards
    ("RuntimeError: Event loop is closed", ~30 per failure, reported through sys.unraisablehook
    from TensorStore's threads, possibly after the restore returned: that filter stays
    installed, and lets every other unraisable exception through)."""
    global _quiet_hook_installed
    if not _quiet_hook_installed:
        previous = sys.unraisablehook

        def hook(unraisable):
            value, tb = unraisable.exc_value, unraisable.exc_traceback
            files = [f.f_code.co_filename for f, _ in traceback.walk_tb(tb)]
            closed_loop = isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
            if closed_loop and files and all("asyncio" in f for f in files):
                return
            previous(unraisable)

        sys.unraisablehook = hook
        _quiet_hook_installed = True
    loggers = [pylogging.getLogger(n) for n in ("absl", "orbax", "jax._src.distributed")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(pylogging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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
