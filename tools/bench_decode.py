"""Benchmark cached inference of qwenjax against `transformers`: prefill and greedy decode speed.

One model (the preset, random weights from `qwenjax.init_model`) is exported with
`save_pretrained` and loaded by `transformers` (torch, eager attention, its DynamicCache), so
both frameworks run the same weights in one process on CPU. For each batch size B:

- prefill: a [B, P] prompt into an empty cache, giving the first new token (qwenjax: the jitted
  chunked prefill, `qwenjax.infer.generate._prefill`; torch: `model(ids, use_cache=True)`);
- decode: N - 1 more greedy tokens, one per step through the cache (qwenjax: the whole loop in
  one jitted `lax.while_loop`, `_decode`; torch: a Python loop of `model(token, past_key_values)`
  steps under `no_grad`, the loop `generate` runs).

Each is warmed up once (qwenjax's warm-up compiles, reported separately), then timed `--iters`
times, the frameworks alternating so background load hits both alike; tokens/s = tokens / median
time. Both must produce the same greedy tokens (`tokens_match`). Prints one JSON line on stdout.

    .venv/bin/python tools/bench_decode.py [--prompt 128 --new 64 --batches 1,8 --iters 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import qwenjax
from qwenjax.infer.generate import _decode, _layout, _prefill, _stop_array
from qwenjax.infer.sampling import Sampling


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Qwenjax:
    def __init__(self, model, tokens: np.ndarray, new: int, chunk: int):
        self.graphdef, self.params = nnx.split(model)
        self.ids, self.positions, self.segs, self.chunk = _layout(tokens.tolist(), chunk)
        self.lengths = jnp.asarray(self.segs.sum(1))
        self.stops = _stop_array((), len(tokens))
        self.key = jax.random.key(0)
        self.settings = Sampling().arrays()
        self.new = new

    def prefill(self):
        first, cache = _prefill(
            self.graphdef,
            self.params,
            self.ids,
            self.positions,
            self.segs,
            self.key,
            self.settings,
            slots=self.ids.shape[1] + self.new,
            chunk=self.chunk,
            greedy=True,
        )
        return jax.block_until_ready((first, cache))

    def decode(self, first, cache):
        out = _decode(
            self.graphdef,
            self.params,
            cache,
            first,
            self.lengths,
            self.stops,
            self.key,
            self.settings,
            steps=self.new,
            greedy=True,
        )
        return np.asarray(jax.block_until_ready(out))


class Torch:
    def __init__(self, model, tokens: np.ndarray, new: int):
        self.model, self.new = model, new
        self.ids = torch.from_numpy(tokens.astype(np.int64))

    @torch.no_grad()
    def prefill(self):
        out = self.model(self.ids, use_cache=True)
        return out.logits[:, -1].argmax(-1), out.past_key_values

    @torch.no_grad()
    def decode(self, first, cache):
        token, tokens = first, [first]
        for _ in range(self.new - 1):
            out = self.model(token[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(-1)
            tokens.append(token)
        return torch.stack(tokens, 1).numpy()


def bench_batch(jx_model, th_model, cfg, B: int, args) -> dict:
    tokens = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, args.prompt), dtype=np.int32)
    jx, th = Qwenjax(jx_model, tokens, args.new, args.chunk), Torch(th_model, tokens, args.new)
    t_compile, (first, cache) = timed(jx.prefill)
    t, jx_out = timed(lambda: jx.decode(first, cache))
    log(f"B={B}: qwenjax compiled prefill+decode in {t_compile + t:.1f}s")
    th_out = th.decode(*th.prefill())  # warm-up
    times: dict[str, list[float]] = {k: [] for k in ("jx_pre", "jx_dec", "th_pre", "th_dec")}
    for _ in range(args.iters):
        t, (first, cache) = timed(jx.prefill)
        times["jx_pre"].append(t)
        t, jx_out = timed(lambda f=first, c=cache: jx.decode(f, c))
        times["jx_dec"].append(t)
        t, (th_first, th_cache) = timed(th.prefill)
        times["th_pre"].append(t)
        t, th_out = timed(lambda f=th_first, c=th_cache: th.decode(f, c))
        times["th_dec"].append(t)
    m = {k: statistics.median(v) for k, v in times.items()}
    log(f"B={B} median ms: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in m.items()))
    pre, dec = B * args.prompt, B * (args.new - 1)
    return {
        f"b{B}_qwenjax_prefill_tok_s": round(pre / m["jx_pre"], 1),
        f"b{B}_torch_prefill_tok_s": round(pre / m["th_pre"], 1),
        f"b{B}_prefill_ratio": round(m["th_pre"] / m["jx_pre"], 2),
        f"b{B}_qwenjax_decode_tok_s": round(dec / m["jx_dec"], 1),
        f"b{B}_torch_decode_tok_s": round(dec / m["th_dec"], 1),
        f"b{B}_decode_ratio": round(m["th_dec"] / m["jx_dec"], 2),
        f"b{B}_qwenjax_compile_s": round(t_compile, 2),
        f"b{B}_tokens_match": bool((jx_out == th_out).all()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-moe-tiny")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row (P)")
    p.add_argument("--new", type=int, default=64, help="new tokens per row (N)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--chunk", type=int, default=512, help="qwenjax prefill chunk")
    p.add_argument("--iters", type=int, default=3)
    # 1 by default: on a shared machine torch's spinning OpenMP threads oversubscribe the cores
    # (measured: 2 threads at load average 12 made torch decode 35x slower than 1 thread).
    p.add_argument("--torch-threads", type=int, default=1, help="0: one per CPU core")
    args = p.parse_args()

    cfg = qwenjax.load_preset(args.preset)  # fp32 compute and parameters
    load = os.getloadavg()[0]  # other processes skew CPU timings; recorded to judge the run
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    jx_model = qwenjax.init_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        qwenjax.save_pretrained(jx_model, tmp)
        th_model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    result = {
        "preset": args.preset,
        "dtype": "float32",
        "prompt": args.prompt,
        "new": args.new,
        "iters": args.iters,
    }
    for B in (int(b) for b in args.batches.split(",")):
        result |= bench_batch(jx_model, th_model, cfg, B, args)
    result |= {
        "torch_attn_impl": th_model.config._attn_implementation,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(load, 2),
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
