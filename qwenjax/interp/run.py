"""`qwenjax sae train EXPERIMENT.yaml`: capture a site's activations from a model, train an
SAE on them with checkpoints and exact resume, evaluate it, write it in SAELens's format.

Run directory:
    config.yaml       the resolved SAE experiment (a resumed run must match it)
    metrics.jsonl     one row per logged step (loss, fvu, l0, dead_fraction, ...) and the
                      evaluations (eval_fvu, eval_l0, ce_clean / ce_spliced / ce_zero_ablated ...);
                      TensorBoard events in tensorboard/
    checkpoints/      Orbax: SAE state + the activation reader's position, every N steps
    activations/      with store: disk, the captured activations (resumable shards)
    sae/              the trained SAE (cfg.json + sae_weights.safetensors, SAELens format)
    eval.json         the final evaluation

The held-out rows are the first `eval_tokens` tokens of the data stream and their sequences
give the spliced-in loss; training rows follow. On resume the activations are captured again
(the same tokens through the same model give the same values) or read from the disk store.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.atomic import output_dir
from qwenjax.data.packing import PackedDataset
from qwenjax.errors import ConfigError, OutputError
from qwenjax.experiment import ExperimentConfig
from qwenjax.interp import activations as A
from qwenjax.interp import sae as S
from qwenjax.interp.capture import check_site, parse_site
from qwenjax.interp.evaluate import reconstruction_metrics, spliced_losses
from qwenjax.interp.experiment import SAEExperiment, dump, sae_experiment_from_dict
from qwenjax.interp.saelens import write_sae
from qwenjax.interp.trainer import (
    ShuffledRows,
    init_state,
    lr_schedule,
    make_optimizer,
    make_train_step,
)
from qwenjax.runtime import RuntimeConfig
from qwenjax.train.checkpoint import RunCheckpointer
from qwenjax.train.data_setup import build_corpus
from qwenjax.train.metrics import MetricsWriter


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_model(exp: SAEExperiment):
    from qwenjax.infer.generate import load_for_inference

    model, tokenizer = load_for_inference(
        exp.model.hf or None, exp.model.checkpoint or None,
        runtime=RuntimeConfig(dtype=exp.model.dtype),
    )
    if tokenizer is None:
        raise ConfigError(f"no tokenizer.json in {exp.model.path}")
    key = check_site(parse_site(exp.site, model.config.num_layers), model)
    return model, tokenizer, key


def token_stream(exp: SAEExperiment, tokenizer):
    """The packed data stream: `model_batch` lanes of `seq_len` tokens."""
    corpus = build_corpus(ExperimentConfig(data=exp.data, seed=exp.seed))
    return iter(PackedDataset(corpus, tokenizer, exp.data.seq_len, seed=exp.seed,
                              lanes=exp.model_batch))


def check_run_dir(exp: SAEExperiment, run_dir: Path) -> bool:
    """True if this resumes a run; refuses a directory that holds anything else."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        import yaml

        old = sae_experiment_from_dict(yaml.safe_load(saved.read_text()))
        if old != exp:
            diff = [k for k, v in exp.to_dict().items() if old.to_dict().get(k) != v]
            raise ConfigError(f"{run_dir} holds an SAE run with other settings ({', '.join(diff)})"
                              "; use another --run-dir")
        return True
    if run_dir.exists() and any(run_dir.iterdir()):
        raise OutputError(f"{run_dir} is not empty and holds no SAE run (no config.yaml)")
    return False


def prepare(exp: SAEExperiment, run_dir: Path, model, tokenizer, key):
    """-> (eval rows, eval token batches, train rows (array or StoreRows))."""
    stream = token_stream(exp, tokenizer)
    eval_batches, eval_rows = [], []
    for batch, acts in A.capture_batches(model, key, stream, exp.eval_tokens):
        eval_batches.append(batch)
        eval_rows.append(acts)
    eval_rows = np.concatenate(eval_rows)
    if exp.store == "memory":
        train_rows, _ = A.collect(model, key, stream, exp.train_tokens)
        if exp.store_dtype == "bfloat16":  # as stored on disk: the same values either way
            train_rows = train_rows.astype(A.DTYPES["bfloat16"]).astype(np.float32)
    else:
        store = A.DiskStore(run_dir / "activations", exp.store_dtype)
        A.fill_store(store, model, key, stream, exp.train_tokens)
        train_rows = A.StoreRows(store)
    return eval_rows, eval_batches, train_rows


def evaluate(exp, model, key, cfg, params, eval_rows, eval_batches, since_fired) -> dict:
    rec = reconstruction_metrics(cfg, params, eval_rows)
    freq = rec.pop("firing_frequency")
    ce = spliced_losses(model, key, cfg, params, eval_batches)
    dead = float(np.mean(np.asarray(since_fired) >= cfg.dead_tokens))
    out = {f"eval_{k}": v for k, v in rec.items()}
    out.update({f"eval_{k}": v for k, v in ce.items()}, eval_dead_fraction=dead)
    return out, freq


def train_sae_run(exp: SAEExperiment, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    resuming = check_run_dir(exp, run_dir)
    n_dev = exp.latent_devices
    if n_dev > len(jax.devices()) or exp.sae.d_sae and exp.sae.d_sae % n_dev:
        raise ConfigError(f"latent_devices {n_dev}: needs that many devices ({len(jax.devices())} "
                          "here) and to divide sae.d_sae")
    model, tokenizer, key = load_model(exp)
    width = model.config.num_experts if key[0] == "router_logits" else model.config.hidden_size
    cfg = exp.sae.resolved(width)  # every setting checked before the run directory is written
    if cfg.width % n_dev:
        raise ConfigError(f"latent_devices {n_dev} does not divide the {cfg.width} latents")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        tmp = run_dir / ".config.yaml.tmp"
        tmp.write_text(dump(exp))
        tmp.replace(run_dir / "config.yaml")
    t0 = time.time()
    eval_rows, eval_batches, train_rows = prepare(exp, run_dir, model, tokenizer, key)
    log(f"captured {len(eval_rows)} eval + {len(train_rows)} train activations of {exp.site} "
        f"({time.time() - t0:.1f}s)")
    mesh = None
    if n_dev > 1:
        from qwenjax.sharding import make_mesh

        mesh = make_mesh({"tensor": n_dev}, jax.devices()[:n_dev])
    rows = ShuffledRows(train_rows, exp.batch_size, exp.seed)
    sample = train_rows[np.arange(min(len(train_rows), 4096))]
    params = S.init_params(cfg, jax.random.key(exp.seed), sample)
    tx = make_optimizer(exp.lr, exp.steps, exp.warmup_steps)
    state = init_state(params, tx, mesh)
    ckpt = RunCheckpointer(run_dir / "checkpoints", keep=exp.checkpoint.keep,
                           async_save=exp.checkpoint.async_save)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    restored = ckpt.restore_latest(abstract, log=log)
    start = 0
    if restored is not None:
        start, state, data_state = restored
        rows.set_state(data_state)
        log(f"resumed from step {start}")
    step_fn = make_train_step(cfg, tx)
    schedule = lr_schedule(exp.lr, exp.steps, exp.warmup_steps)
    writer = MetricsWriter(run_dir, exp.steps, start_step=start)
    result = {}
    try:
        t_last = time.perf_counter()
        for step in range(start + 1, exp.steps + 1):
            state, metrics = step_fn(state, jnp.asarray(next(rows)))
            row = {}
            if step % exp.log_every == 0 or step == exp.steps:
                now = time.perf_counter()
                row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                row.update(lr=float(schedule(step - 1)),
                           tokens_per_s=exp.batch_size * exp.log_every / (now - t_last))
                t_last = now
            if (exp.eval_every and step % exp.eval_every == 0) or step == exp.steps:
                result, freq = evaluate(exp, model, key, cfg, state.params, eval_rows,
                                        eval_batches, state.since_fired)
                row.update(result)
            if row:
                row.setdefault("loss", float(metrics["loss"]))
                row.setdefault("grad_norm", float(metrics["grad_norm"]))
                row.setdefault("lr", float(schedule(step - 1)))
                writer.write(step, row, steps_done_this_run=step - start)
            if step % exp.checkpoint.every == 0 or step == exp.steps:
                ckpt.save(step, state, rows.get_state())
        ckpt.wait()
    finally:
        writer.close()
        ckpt.close()
    if not result:  # resumed at the last step: evaluate what was restored
        result, freq = evaluate(exp, model, key, cfg, state.params, eval_rows, eval_batches,
                                state.since_fired)
    params = jax.device_get(state.params)
    with output_dir(run_dir / "sae", "sae") as tmp:
        write_sae(tmp, cfg, params, site=exp.site, model_name=exp.model.path,
                  extra={"firing_frequency": [float(f) for f in freq]})
    summary = {"run_dir": str(run_dir), "steps": exp.steps, "site": exp.site, **result}
    tmp = run_dir / ".eval.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(run_dir / "eval.json")
    return summary

