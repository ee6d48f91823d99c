"""Benchmark one forward and one train step (loss + grads) of qwenjax against `transformers`.

Both frameworks run the same architecture (the preset, exported through `to_hf_config`) on the
same random batch of B rows of T tokens in one process on CPU:

- forward: logits for [B, T] input ids (torch under `no_grad`, qwenjax jitted).
- train step: next-token cross-entropy + 0.001 * router load-balancing loss and the gradients of
  every parameter (torch: `loss.backward()` in eager mode; qwenjax: `jax.value_and_grad` under
  `jax.jit` of the split parameter pytree, see qwenjax/train/step.py). No optimizer update on either side.

To judge what a ratio can reach on this machine, it also reports the step's model FLOPs
(`flops_per_token`: 6 x active matmul parameters + causal attention, no remat or padding), the
GFLOP/s each framework achieves with them, and the fp32 matmul peak measured in the same run (the
faster of a 1024^3 GEMM in XLA and in torch). `target_needs_peak_fraction` is the share of that
peak the whole qwenjax step must sustain for the 2x target.

Each is warmed up once (qwenjax's warm-up is its compile, reported separately), then timed for
`--iters` steps in three rounds that alternate the frameworks so background load skews both alike
(see `interleaved_medians`); throughput
is B*T / median step time. Prints one JSON line on stdout; progress goes to stderr. CPU timings
on a shared machine are noisy: compare `load_avg_1m` across runs.

    .venv/bin/python tools/bench_step.py [--batch 8 --seq 256 --iters 5 --preset qwen3-moe-tiny]
        [--attention-impl auto|xla|splash --set head_dim=128 ...]

`--attention-impl` is qwenjax's `runtime.attention_impl` (auto: splash on TPU where the shape
allows, else our blockwise kernel (fp32 here: cuDNN, which takes bf16 only, is in
bench_long_context.py); splash off TPU runs in Pallas interpret mode, slow, and needs
head_dim and seq multiples of 128). The JSON records the setting and the kernel that ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch
import transformers
from flax import nnx

import qwenjax
from qwenjax.errors import ConfigError
from qwenjax.model.sequence_ops import attention_impl
from qwenjax.train.loss import Batch, batch_from_tokens
from qwenjax.train.metrics import flops_per_token, measure_peak_flops
from qwenjax.train.step import make_forward, make_loss_and_grad, split_model

Step = Callable[[], object]
AUX_WEIGHT = 0.001  # transformers' router_aux_loss_coef default, so both losses match
TARGET_TRAIN_RATIO = 2.0  # the target: qwenjax train step >= 2x torch


def torch_peak_flops(n: int = 1024, seconds: float = 1.0) -> float:
    """fp32 n^3 GEMM FLOP/s of torch on this machine (as `measure_peak_flops` for XLA)."""
    a = torch.randn(n, n)
    a @ a
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        count += 1
    return 2.0 * n**3 * count / (time.perf_counter() - t0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def interleaved_medians(steps: dict[str, Step], iters: int, rounds: int = 3,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds per step of each callable, taken in `rounds` rounds that visit every
    callable in turn, so that load from other processes on a shared machine hits every framework
    alike. Each visit first runs `warmup` untimed steps: measured on the 2-core machine, the
    first steps after a switch (or a pause) are 10-45 % slower for both frameworks (the other
    one's spinning worker threads, cold thread pools and allocator), so strict per-step
    alternation timed neither at its steady state."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    per_round = -(-iters // rounds)
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(warmup):
                step()
            for _ in range(per_round):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def setup_qwenjax(cfg: qwenjax.ModelConfig, tokens: np.ndarray) -> tuple[Step, Step, float]:
    model = qwenjax.init_model(cfg, seed=0)
    batch = batch_from_tokens(jax.numpy.asarray(tokens))
    ids = batch.input_ids

    graphdef, params = split_model(model)
    fwd_fn = make_forward(graphdef)
    grad_fn = make_loss_and_grad(graphdef, aux_weight=AUX_WEIGHT)

    def fwd(model: nnx.Module, ids: jax.Array) -> jax.Array:
        return fwd_fn(params, ids)

    def train(model: nnx.Module, batch: Batch) -> tuple[jax.Array, nnx.State]:
        (loss, _), grads = grad_fn(params, batch)
        return loss, grads  # returning grads keeps XLA from dead-code-eliminating the backward

    # The first call traces, compiles and runs once; that is the compile cost a user pays.
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(model, ids))
    jax.block_until_ready(train(model, batch))
    compile_s = time.perf_counter() - t0
    log(f"qwenjax compiled in {compile_s:.1f}s")
    return (lambda: jax.block_until_ready(fwd(model, ids)),
            lambda: jax.block_until_ready(train(model, batch)), compile_s)


def setup_torch(cfg: qwenjax.ModelConfig, tokens: np.ndarray) -> tuple[Step, Step, dict]:
    torch.set_num_threads(os.cpu_count() or 1)
    hf = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type")}
    config = transformers.Qwen3MoeConfig(**hf)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).to(getattr(torch, cfg.runtime.dtype))
    model.train()  # Qwen has no dropout; train mode only matches what a training loop runs
    # Same T input tokens as qwenjax; HF shifts labels itself, so it scores T-1 of them.
    ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))

    def fwd() -> None:
        with torch.no_grad():
            model(ids)

    def train() -> None:
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    fwd()  # warm-up: first-call allocations and lazy init
    train()
    info = {"attn_impl": model.config._attn_implementation,
            "experts_impl": getattr(model.config, "_experts_implementation", None)}
    return fwd, train, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--preset", default="qwen3-moe-tiny")
    p.add_argument("--dtype", default="float32", choices=["float32"])
    p.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "splash"])
    p.add_argument("--set", action="append", default=[], help="model field=value (ints)")
    args = p.parse_args()

    over = {k: int(v) for k, v in (s.split("=") for s in args.set)}
    cfg = qwenjax.load_preset(args.preset).replace(**over).with_runtime(
        dtype=args.dtype, param_dtype=args.dtype, attention_impl=args.attention_impl)
    try:  # the kernel the model's attention runs, as `causal_attention` decides it
        kernel = attention_impl(args.attention_impl, args.seq, cfg.head_dim,
                                cfg.runtime.splash_block, args.dtype)
    except ConfigError as e:
        raise SystemExit(f"bench_step: {e}") from None
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    n = args.batch * args.seq

    load = os.getloadavg()[0]  # other processes skew CPU timings; recorded to judge the run
    jx_fwd, jx_train, compile_s = setup_qwenjax(cfg, tokens)
    th_fwd, th_train, th = setup_torch(cfg, tokens)
    m = interleaved_medians({"jx_fwd": jx_fwd, "th_fwd": th_fwd}, args.iters)
    m |= interleaved_medians({"jx_train": jx_train, "th_train": th_train}, args.iters)
    peak = max(measure_peak_flops(1024, seconds=1.0), torch_peak_flops())
    step_flops = flops_per_token(cfg, args.seq) * n
    gflops = lambda seconds: round(step_flops / seconds / 1e9, 1)
    log("median ms/step: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in m.items()))
    result = {
        "preset": args.preset, "overrides": over, "dtype": args.dtype, "batch": args.batch,
        "seq": args.seq, "attention_impl": args.attention_impl, "attention_kernel": kernel,
        "iters": args.iters, "tokens_per_step": n,
        "qwenjax_forward_tok_s": round(n / m["jx_fwd"], 1),
        "qwenjax_train_tok_s": round(n / m["jx_train"], 1),
        "torch_forward_tok_s": round(n / m["th_fwd"], 1),
        "torch_train_tok_s": round(n / m["th_train"], 1),
        "forward_ratio": round(m["th_fwd"] / m["jx_fwd"], 3),
        "train_ratio": round(m["th_train"] / m["jx_train"], 3),
        "model_gflop_per_train_step": round(step_flops / 1e9, 3),
        "qwenjax_train_gflops": gflops(m["jx_train"]), "torch_train_gflops": gflops(m["th_train"]),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "qwenjax_train_peak_fraction": round(step_flops / m["jx_train"] / peak, 3),
        "torch_train_peak_fraction": round(step_flops / m["th_train"] / peak, 3),
        "target_needs_peak_fraction": round(TARGET_TRAIN_RATIO * step_flops / m["th_train"] / peak, 3),
        "qwenjax_compile_s": round(compile_s, 2),
        "torch_attn_impl": th["attn_impl"], "torch_experts_impl": th["experts_impl"],
        "torch_threads": torch.get_num_threads(), "load_avg_1m": round(load, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "jax_version": jax.__version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "devices": jax.device_count(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
