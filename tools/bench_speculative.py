"""Benchmark self-speculative decoding (the MTP module drafting, infer/speculative.py) against
plain greedy decoding: tokens/s, main-model passes, tokens per pass and draft acceptance.

The model is a preset with one MTP layer. With `--train-steps N > 0` it first learns a
deterministic sequence rule (x' = 5x + 3 mod V) with the MTP loss, so drafts are mostly accepted
(the best case); with 0 its untrained drafts are mostly rejected (the worst case: what the
drafting and wider verify cost). Prompts follow the rule. Both paths must give the same greedy
tokens (`tokens_match`). Timings: median of `--iters` after a compiling warm-up. Prints one JSON
line on stdout.

    .venv/bin/python tools/bench_speculative.py [--preset qwen3.5-moe-tiny --batch 4 --new 64
        --depths 1,2,3 --train-steps 12]

On a CPU, a pass over D + 1 tokens costs nearly D + 1 single-token passes (compute-bound), so
the gain there is small; on an accelerator decoding is bound by reading the weights, which one
pass over D + 1 tokens reads once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import qwenjax
from qwenjax.infer.generate import generate, generate_speculative
from qwenjax.model.mtp import mtp_arrays
from qwenjax.train.loss import Batch
from qwenjax.train.step import init_train_state, make_train_step, split_model


def rule(x, V):
    return (5 * x + 3) % V


def train(model, V: int, steps: int, B: int = 8, T: int = 64):
    graphdef, params = split_model(model)
    tx = optax.adam(1e-2)
    step = make_train_step(graphdef, tx, aux_weight=0.0, z_weight=0.0, mtp_weight=1.0)
    state = init_train_state(params, tx)
    for s in range(steps):
        x = np.zeros((B, T + 2), np.int64)
        x[:, 0] = np.random.default_rng(s).integers(0, V, B)
        for t in range(1, T + 2):
            x[:, t] = rule(x[:, t - 1], V)
        x = x.astype(np.int32)
        seg = np.ones_like(x)
        pos = np.broadcast_to(np.arange(T + 2), x.shape).astype(np.int32)
        mask = np.ones((B, T), np.float32)
        batch = Batch(x[:, :T], x[:, 1:T + 1], mask, pos[:, :T], seg[:, :T],
                      *mtp_arrays(x, seg, mask, 1))
        state, _ = step(state, jax.tree.map(lambda a: jnp.asarray(a)[None], batch))
    return nnx.merge(graphdef, state.params)


def median_time(fn, iters: int):
    fn()  # compile
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3.5-moe-tiny")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--depths", default="1,2,3")
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()

    load = os.getloadavg()[0]
    V = args.vocab
    cfg = qwenjax.load_preset(args.preset).replace(vocab_size=V, mtp_layers=1)
    model = qwenjax.init_model(cfg, seed=0)
    if args.train_steps:
        model = train(model, V, args.train_steps)
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(args.batch):
        row = [int(rng.integers(0, V))]
        for _ in range(args.prompt - 1):
            row.append(int(rule(row[-1], V)))
        prompts.append(row)
    n = args.new
    t_plain, ref = median_time(lambda: generate(model, prompts, max_new_tokens=n), args.iters)
    result = {"preset": args.preset, "batch": args.batch, "new": n, "trained": args.train_steps,
              "plain_tok_s": round(args.batch * n / t_plain, 1)}
    for depth in (int(d) for d in args.depths.split(",")):
        t, (out, stats) = median_time(
            lambda depth=depth: generate_speculative(model, prompts, depth=depth, max_new_tokens=n),
            args.iters)
        result |= {
            f"d{depth}_tok_s": round(args.batch * n / t, 1),
            f"d{depth}_speedup": round(t_plain / t, 2),
            f"d{depth}_tokens_per_pass": round(stats["tokens_per_pass"], 2),
            f"d{depth}_acceptance": round(stats["acceptance"], 3),
            f"d{depth}_tokens_match": out == ref,
        }
        print(f"depth {depth}: {result[f'd{depth}_tok_s']} tok/s", file=sys.stderr, flush=True)
    result |= {"load_avg_1m": round(load, 2), "jax_version": jax.__version__}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
