"""The training run: `qwenjax train EXPERIMENT.yaml` end to end.

Order of work: validate everything (config, mesh, batch/axes divisibility, run directory, a
tokenizer file, the export target) before anything is written; then tokenizer, data, sharded
parameters, optimizer; resume from the newest checkpoint that restores (damaged newer steps are
moved to checkpoints/damaged/); the jitted step loop with metrics, periodic async checkpoints, a
checkpoint on SIGTERM (preemption) and at the end; finally the Hugging Face export and a short
greedy sample. A command that fails before the run holds a checkpoint takes back what it added
to the run directory.

Run directory: config.yaml (resolved experiment), tokenizer/, metrics.jsonl, tensorboard/,
checkpoints/<step>/, hf/ (export).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from qwenjax.atomic import check_output
from qwenjax.config import ModelConfig
from qwenjax.errors import ConfigError, QwenJaxError
from qwenjax.experiment import (
    ExperimentConfig,
    dump_experiment,
    experiment_from_dict,
    same_run,
)
from qwenjax.model.mtp import mtp_arrays
from qwenjax.model.partition import abstract_model, init_sharded
from qwenjax.ops.context_layout import to_layout
from qwenjax.paths import as_path, is_url, rmtree
from qwenjax.sharding import activate, check_rules, make_mesh, mesh_platform
from qwenjax.train.checkpoint import (
    RunCheckpointer,
    checkpoint_params_shapes,
    load_params,
    read_model_config,
    tree_shapes,
)
from qwenjax.train.data_setup import build_dataset, build_tokenizer
from qwenjax.train.loss import Batch
from qwenjax.train.metrics import MetricsWriter, flops_per_token, measure_peak_flops
from qwenjax.train.optimizer import learning_rate, make_optimizer
from qwenjax.train.sft_run import export_lora_run, lora_model
from qwenjax.train.step import batch_sharding as train_batch_sharding
from qwenjax.train.step import init_train_state, make_train_step


class TrainingError(QwenJaxError):
    """The run cannot go on (e.g. K non-finite steps in a row)."""


def log(msg: str) -> None:
    logging.info(msg)
    print(msg, file=sys.stderr, flush=True)


def check_run_dir(exp: ExperimentConfig, run_dir: Path, cfg: ModelConfig) -> None:
    """Read-only: the run directory may receive this experiment. Its config.yaml, if any, must
    be this experiment; without one, checkpoints already there must be of this model."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file; pick another --run-dir")
    path = run_dir / "config.yaml"
    ckpts = _steps_on_disk(run_dir / "checkpoints")
    if path.exists():
        try:
            saved = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"{path}: not valid YAML ({first}); repair it or pick a new --run-dir"
            ) from None
        try:
            previous = experiment_from_dict(saved if isinstance(saved, dict) else {}, quiet=True)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}; repair it or pick a new --run-dir") from None
        if not same_run(previous, exp):
            hint = "" if ckpts else f" (it has no checkpoint yet: delete {run_dir} to start over)"
            raise ConfigError(
                f"{run_dir} holds a different experiment (its config.yaml differs); "
                f"resume it with its own config or pick a new --run-dir{hint}"
            )
    elif ckpts:
        found = checkpoint_params_shapes(run_dir / "checkpoints")
        if found is None:
            raise ConfigError(
                f"{run_dir} has checkpoints but no config.yaml, and their model cannot be read; "
                "restore its config.yaml or pick a new --run-dir"
            )
        _, abstract = abstract_model(cfg)
        if found != tree_shapes(nnx.to_pure_dict(abstract)):
            raise ConfigError(
                f"{run_dir} has no config.yaml and its checkpoints hold a different model than "
                "this experiment's; restore its config.yaml or pick a new --run-dir"
            )


def _steps_on_disk(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if (
        ckpt_dir.is_dir()) else []


def write_run_config(exp: ExperimentConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if is_url(path) and not path.exists():  # one object is written whole or not at all
        path.write_text(dump_experiment(exp))
    elif not path.exists():
        tmp = path.with_suffix(f".yaml.tmp{os.getpid()}")
        tmp.write_text(dump_experiment(exp))
        tmp.rename(path)


class RunDirUndo:
    """What this command adds to a run directory, taken back if the command fails before the
    run holds any checkpoint: a failed first attempt (a bad tokenizer path, a crash in step 1)
    leaves the directory as it was, so the corrected command is not refused as "a different
    experiment". Once a checkpoint exists, the run has started and everything stays."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.existed = run_dir.is_dir()
        self.before = _names(run_dir) if self.existed else set()

    def revert(self) -> None:
        if _steps_on_disk(self.run_dir / "checkpoints") or not self.run_dir.is_dir():
            return
        # Only entries that appeared during this command and are a training run's own (another
        # command, e.g. `qwenjax plan` writing runs/NAME/plan, may have added its own meanwhile).
        for name in _names(self.run_dir) - self.before:
            if not _is_run_entry(name):
                continue
            path = self.run_dir / name
            rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        if not self.existed and not is_url(self.run_dir):  # a bucket prefix is no directory
            try:
                self.run_dir.rmdir()  # only if nothing else is left in it
            except OSError:
                pass


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _is_run_entry(name: str) -> bool:
    """What `train` writes at the top of a run directory (config, metrics, checkpoints, the
    tokenizer, TensorBoard, the export, and their temporary files)."""
    return name in ("tokenizer", "tensorboard", "checkpoints", "hf") or name.startswith(
        ("config.yaml", "metrics.", ".metrics.", ".hf.")
    )


def _micro_batches(arrays: dict, grad_accum: int, sharding, context: int = 1,
                   layout: str = "zigzag") -> Batch:
    """Host arrays [B, T] -> Batch of [A, B/A, T] device arrays; with context > 1 every field is
    put into the sequence layout here, once (the loss is a sum over tokens: no way back needed)."""

    def put(x):
        x = np.asarray(x)
        if context > 1:
            x = to_layout(x, context, layout, axis=1)
        x = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x) if sharding else jax.device_put(x)

    return Batch(**{k: put(arrays[k]) for k in Batch._fields if k in arrays})


def _with_mtp(arrays: dict, depth: int) -> dict:
    """Add the MTP inputs, targets and masks (from the rows' look-ahead windows) to a batch."""
    window_ids, window_segments = arrays.pop("window_ids"), arrays.pop("window_segments")
    if depth:
        arrays["mtp_inputs"], arrays["mtp_targets"], arrays["mtp_mask"] = mtp_arrays(
            window_ids, window_segments, arrays["loss_mask"], depth)
    return arrays


def train(exp: ExperimentConfig, run_dir: str | Path, *, overwrite_export: bool = False) -> dict:
    """Run (or resume) an experiment. Returns a summary dict (final step, loss, paths).

    Everything that can be checked without writing is checked first (config, mesh, run
    directory, tokenizer file, export target); if the command then fails before the run holds a
    checkpoint, what it added to the run directory is removed (`RunDirUndo`).
    `overwrite_export`: run_dir/hf may replace a directory that is not a qwenjax export."""
    run_dir = as_path(run_dir)
    cfg = exp.model_config()
    mesh = make_mesh(exp.mesh.shape())
    rules = check_rules(exp.mesh.rules)
    if exp.init_from:
        src = read_model_config(exp.init_from)
        cfg = src.replace(runtime=cfg.runtime)
    check_run_dir(exp, run_dir, cfg)
    tokenizer = None
    if exp.tokenizer.kind != "bpe":  # a file: read (and so checked) before anything is written
        tokenizer = build_tokenizer(exp, run_dir)
    vocab = tokenizer.vocab_size if tokenizer is not None else exp.tokenizer.vocab_size
    if vocab > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {vocab} tokens but the model's vocab_size is {cfg.vocab_size}"
        )
    primary = jax.process_index() == 0  # the one process that writes files
    if exp.export_hf and primary:
        check_output(run_dir / "hf", "hf-model", overwrite=overwrite_export)
    undo = RunDirUndo(run_dir) if primary else None
    try:
        return _run(exp, run_dir, cfg, mesh, rules, tokenizer, primary, overwrite_export)
    except BaseException:
        if undo is not None:
            undo.revert()
        raise


def _run(exp, run_dir, cfg, mesh, rules, tokenizer, primary, overwrite_export) -> dict:
    if primary:
        write_run_config(exp, run_dir)
        if tokenizer is None:
            build_tokenizer(exp, run_dir)  # trains and saves a BPE once
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("qwenjax: run directory ready")
    if tokenizer is None:
        tokenizer = build_tokenizer(exp, run_dir)  # loads what the primary saved
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}"
        )
    dataset = iter(build_dataset(exp, tokenizer))  # the iterator holds the resumable position
    local_batch = exp.batch_size // jax.process_count()  # this host's lanes
    baseline = unigram_entropy(iter(build_dataset(exp, tokenizer)), local_batch, tokenizer.vocab_size)

    if exp.init_from:
        model = load_params(exp.init_from, mesh=mesh, rules=rules, runtime=exp.runtime)
        graphdef, params = nnx.split(model)
    else:
        graphdef, params = init_sharded(cfg, mesh, rules, exp.seed)
    frozen = ()  # LoRA: the base, read by the step but not trained
    if exp.lora.rank:
        graphdef, params, frozen = lora_model(nnx.merge(graphdef, params), exp, mesh, rules)
    tx = make_optimizer(exp.optimizer, exp.steps, params)
    state = init_train_state(params, tx)
    # Counters and optimizer scalars are created on one device; replicate them over the mesh.
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), state
    )
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    batch_sharding = train_batch_sharding(mesh, rules)

    ckpt = RunCheckpointer(run_dir / "checkpoints", keep=exp.checkpoint.keep,
                           async_save=exp.checkpoint.async_save)
    start = 0
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = ckpt.restore_latest(abstract, log=log)
    if restored is not None:
        start, state, data_state = restored
        hosts = data_state.get("hosts", [])
        if len(hosts) != jax.process_count():
            raise ConfigError(
                f"checkpoint step {start} was written by {len(hosts)} processes, this run has "
                f"{jax.process_count()}; resume with the same number of hosts"
            )
        dataset.set_state(hosts[jax.process_index()])
        log(f"resumed from step {start} ({run_dir / 'checkpoints'})")

    step_fn = make_train_step(
        graphdef, tx, aux_weight=exp.aux_loss_weight, z_weight=exp.z_loss_weight,
        mtp_weight=exp.mtp.weight if exp.mtp.depth else 0.0, state_sharding=state_sharding,
        batch_sharding=batch_sharding,
        frozen_sharding=jax.tree.map(lambda x: x.sharding, frozen[0]) if frozen else None,
        lora_dropout=exp.lora.dropout if exp.lora.rank else 0.0, seed=exp.seed,
    )
    schedule = learning_rate(exp.optimizer, exp.steps)
    flops_tok = flops_per_token(cfg, exp.data.seq_len)
    # Simulated CPU devices share the host's cores: their peak is one measurement, not N.
    peak = measure_peak_flops() * (1 if mesh_platform(mesh) == "cpu" else mesh.size)
    writer = MetricsWriter(run_dir, exp.steps, start_step=start) if primary else None

    stop = {"signal": None}
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    summary = {"run_dir": str(run_dir), "start_step": start, "unigram_baseline": baseline}
    log(f"unigram entropy of the training stream: {baseline:.3f} nats/token")
    with activate(mesh, exp.mesh.rules, exp.mesh.context_layout, exp.runtime.platform):
        try:
            t_last, step = time.perf_counter(), start
            pending = None  # (step, its bad-step counter), read one step late
            for step in range(start + 1, exp.steps + 1):
                arrays = dataset.next_batch(local_batch)
                if exp.mtp.depth:
                    arrays = _with_mtp(arrays, exp.mtp.depth)
                state, metrics = step_fn(state, _micro_batches(arrays, exp.grad_accum, batch_sharding,
                                                            exp.mesh.context, exp.mesh.context_layout),
                                         *frozen)
                # Reading this step's counter now would wait for it to finish before the next is
                # dispatched; the previous step's is ready or nearly so. Skipped steps change
                # nothing, so stopping one step later loses nothing.
                if pending is not None:
                    check_bad_steps(*pending, exp.max_bad_steps, run_dir)
                pending = (step, metrics["bad_steps"])
                if step % exp.log_every == 0 or step == exp.steps:
                    now = time.perf_counter()
                    tokens = exp.batch_size * exp.data.seq_len * (step - max(start, step - exp.log_every))
                    tps = tokens / (now - t_last)
                    t_last = now
                    metrics = jax.device_get(metrics)
                    metrics.update(lr=float(schedule(step - 1)), tokens_per_s=tps,
                                   mfu=tps * flops_tok / peak, skipped=int(state.skipped))
                    metrics.update(getattr(dataset, "stats", {}))  # SFT: truncated / dropped
                    if writer is not None:
                        writer.write(step, metrics, steps_done_this_run=step - start)
                    summary["loss"] = float(metrics["loss"])
                if step % exp.checkpoint.every == 0 or step == exp.steps:
                    ckpt.save(step, state, all_data_states(dataset))
                if stop["signal"] is not None:
                    ckpt.save(step, state, all_data_states(dataset), force=True)
                    ckpt.wait()
                    log(f"received signal {stop['signal']}: saved step {step}, exiting")
                    summary["preempted_at"] = step
                    return summary
            if pending is not None:
                check_bad_steps(*pending, exp.max_bad_steps, run_dir)
            summary["final_step"] = step
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            ckpt.close()
            if writer is not None:
                writer.close()

    params = state.params
    if jax.process_count() > 1:  # every process needs every tensor addressable to write it
        params = jax.jit(lambda p: p, out_shardings=replicated)(params)
        frozen = tuple(jax.jit(lambda p: p, out_shardings=replicated)(f) for f in frozen)
    model = nnx.merge(graphdef, params, *frozen)
    if exp.lora.rank and primary:
        summary.update(export_lora_run(model, exp, run_dir, tokenizer, overwrite_export))
    elif exp.export_hf and primary:
        from qwenjax.hf.convert import save_pretrained

        ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
        out = save_pretrained(model, run_dir / "hf", dtype=exp.runtime.param_dtype, generation=ids,
                              tokenizer=tokenizer, overwrite=overwrite_export)
        summary["hf_dir"] = str(out)
        log(f"exported Hugging Face checkpoint to {out}")
    if exp.sample_tokens:  # every process takes part in the computation; all get the same text
        summary["sample"] = sample_text(model, tokenizer, exp.sample_tokens)
        log(f"sample: {summary['sample']!r}")
    return summary


def check_bad_steps(step: int, bad_steps, limit: int, run_dir: Path) -> None:
    bad = int(bad_steps)
    if bad >= limit:
        raise TrainingError(
            f"{bad} non-finite steps in a row at step {step}; stopping. The newest "
            f"checkpoint in {run_dir / 'checkpoints'} is the last good state."
        )


def all_data_states(iterator) -> dict:
    """Every process's data-iterator state (small JSON), gathered so the checkpoint holds all."""
    local = iterator.get_state()
    if jax.process_count() == 1:
        return {"hosts": [local]}
    raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
    size = 1 << 16
    if raw.size > size:
        raise TrainingError(f"data state of {raw.size} bytes exceeds {size}")
    buf = np.zeros(size + 8, np.uint8)
    buf[:8] = np.frombuffer(np.int64(raw.size).tobytes(), np.uint8)
    buf[8:8 + raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(buf))  # [processes, size + 8]
    states = []
    for row in gathered:
        n = int(np.frombuffer(row[:8].tobytes(), np.int64)[0])
        states.append(json.loads(row[8:8 + n].tobytes()))
    return {"hosts": states}


def unigram_entropy(iterator, batch: int, vocab_size: int, rows: int = 2048) -> float:
    """Entropy (nats/token) of the token distribution over the first `rows` training rows: the
    loss of the best model that ignores context, the bar a trained LM must clear."""
    counts = np.zeros(vocab_size, np.int64)
    for _ in range(max(1, rows // batch)):
        counts += np.bincount(iterator.next_batch(batch)["targets"].ravel(),
                              minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def sample_text(model, tokenizer, n: int, prompt: str = "def ") -> str:
    from qwenjax.infer.generate import generate

    ids = tokenizer.encode(prompt)
    new = generate(model, [ids], max_new_tokens=n, temperature=0.0, stop_tokens=[tokenizer.eos_id])
    return prompt + tokenizer.decode(new[0])

