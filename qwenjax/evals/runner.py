"""Running an eval: build every task's prompts, generate in batches, score, report.

`run(model, tokenizer, cfg, out_dir)` is the harness (any `EvalModel`: tests pass scripted
ones); `run_experiment(exp, run_dir)` is `qwenjax eval`: it loads the experiment's model first.
Prompts of one length are generated together in batches of `eval.batch_size`, the last batch
padded with repeats so each length compiles once. The output directory goes through
`qwenjax.atomic.output_dir` (kind "eval-report"): a failed run leaves the previous results in
place, a directory that is not an eval report is refused unless `overwrite`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qwenjax.atomic import check_output, output_dir
from qwenjax.data.tokenizer import Tokenizer
from qwenjax.evals import needle, ruler
from qwenjax.evals.filler import SentenceSource
from qwenjax.evals.model_api import EvalModel, call_batched
from qwenjax.evals.perplexity import run_perplexity
from qwenjax.evals.report import write_all
from qwenjax.evals.tasks import Sample, TaskContext, sample_rng, score
from qwenjax.experiment import EVAL_TASKS, EvalConfig, ExperimentConfig
from qwenjax.paths import as_path

# name -> (sample builder, has a depth axis)
GENERATION_TASKS: dict[str, tuple[Callable[..., Sample], bool]] = {
    "passkey": (needle.passkey, True),
    "niah_single": (needle.niah_single, True),
    "niah_multikey": (needle.niah_multikey, True),
    "variable_tracking": (ruler.variable_tracking, False),
    "common_words": (ruler.common_words, False),
}
assert set(GENERATION_TASKS) | {"perplexity"} == set(EVAL_TASKS)


def build_samples(task: str, ctx: TaskContext, cfg: EvalConfig) -> list[Sample]:
    make, has_depth = GENERATION_TASKS[task]
    depths = cfg.depths if has_depth else [None]
    return [
        make(ctx, length, d, sample_rng(cfg.seed, task, length, j, i))
        for length in cfg.lengths
        for j, d in enumerate(depths)
        for i in range(cfg.samples)
    ]


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def summarise(task: str, samples: list[Sample], scores: list[float], cfg: EvalConfig) -> dict:
    has_depth = GENERATION_TASKS[task][1]
    by_length = [_mean([s for x, s in zip(samples, scores) if x.length == n]) for n in cfg.lengths]
    out: dict[str, Any] = {
        "lengths": list(cfg.lengths),
        "samples_per_cell": cfg.samples,
        "by_length": by_length,
        "mean": _mean(scores),
        "depths": None,
    }
    if has_depth:
        out["depths"] = list(cfg.depths)
        out["grid"] = [
            [
                _mean([s for x, s in zip(samples, scores) if x.length == n and x.depth == d])
                for n in cfg.lengths
            ]
            for d in cfg.depths
        ]
    return out


def run(
    model: EvalModel,
    tokenizer: Tokenizer,
    cfg: EvalConfig,
    out_dir: str | Path,
    *,
    name: str = "model",
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    overwrite: bool = False,
    inputs: list[str | Path] = (),
) -> dict[str, Any]:
    """Run `cfg.tasks` on `model`; write results.json, results.md and PNGs to `out_dir`."""
    check_output(out_dir, "eval-report", overwrite=overwrite, inputs=inputs)  # before the work
    t0 = time.time()
    ctx = TaskContext(tokenizer, SentenceSource(tokenizer, cfg.filler), num_keys=cfg.num_keys)
    results: dict[str, Any] = {
        "model": name,
        "config": vars(cfg),
        "lengths": list(cfg.lengths),
        "tasks": {},
        "perplexity": {},
        "samples": [],
    }
    for task in [t for t in cfg.tasks if t in GENERATION_TASKS]:
        samples = build_samples(task, ctx, cfg)  # all built first: a too-short length fails fast
        scores = []
        for length in cfg.lengths:
            group = [s for s in samples if s.length == length]
            new_tokens = group[0].max_new_tokens
            outputs = call_batched(
                lambda b, n=new_tokens: model.generate([s.prompt for s in b], n),
                group,
                cfg.batch_size,
            )
            for s, out in zip(group, outputs):
                text = tokenizer.decode(out)
                scores.append(score(text, s.answers))
                results["samples"].append(
                    {
                        "task": task,
                        "length": length,
                        "depth": s.depth,
                        "answers": s.answers,
                        "output": text,
                        "score": scores[-1],
                        **s.meta,
                    }
                )
            log(
                f"eval {task} length {length}: {100 * _mean(scores[-len(group) :]):.0f}% "
                f"({time.time() - t0:.0f}s)"
            )
        results["tasks"][task] = summarise(task, samples, scores, cfg)
    if "perplexity" in cfg.tasks:
        ppl = run_perplexity(
            model,
            ctx.sentences,
            list(cfg.lengths),
            samples=cfg.samples,
            buckets=cfg.ppl_buckets,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
        results["perplexity"] = {str(n): rows for n, rows in ppl.items()}
        log(f"eval perplexity done ({time.time() - t0:.0f}s)")
    results["elapsed_s"] = time.time() - t0
    results = _finite(results)
    with output_dir(out_dir, "eval-report", overwrite=overwrite, inputs=inputs) as tmp:
        results["files"] = write_all(results, tmp)
    return results


def _finite(x):
    """NaN (an empty cell or bucket) -> None, so results.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def run_experiment(
    exp: ExperimentConfig, run_dir: str | Path, out_dir: str | Path | None = None, *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`qwenjax eval`: load the experiment's model (see `loading`) and run its eval section."""
    from qwenjax.evals.loading import eval_mesh, load
    from qwenjax.evals.model_api import QwenJaxModel
    from qwenjax.sharding import check_rules

    out = as_path(out_dir or exp.eval.output_dir or as_path(run_dir) / "eval")
    check_output(out, "eval-report", overwrite=overwrite)  # before loading a model for nothing
    model, tokenizer, src = load(exp, run_dir)
    # Under the experiment's mesh: with `context` > 1, prefill and scoring are sequence-parallel.
    evaluated = QwenJaxModel(model, stop_tokens=[tokenizer.eos_id], mesh=eval_mesh(exp),
                             rules=check_rules(exp.mesh.rules),
                             context_layout=exp.mesh.context_layout)
    results = run(evaluated, tokenizer, exp.eval, out, name=str(src), overwrite=overwrite,
                  inputs=[src])
    return {
        "output_dir": str(out),
        "files": results["files"],
        "summary": {t: r["by_length"] for t, r in results["tasks"].items()},
        "elapsed_s": round(results["elapsed_s"], 1),
    }
