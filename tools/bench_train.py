"""Training-step throughput and MFU: the main job's step (experiments/main.yaml: tiny Qwen3-MoE,
8 simulated devices, mesh data=2 x expert=4) and a larger CPU config on one device. One JSON line.

MFU = achieved model FLOP/s (6 x active matmul params + causal attention, per token; see
qwenjax/train/metrics.py) / the machine's fp32 matmul peak measured in the same run.

    .venv/bin/python tools/bench_train.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwenjax.experiment import load_experiment
from qwenjax.model.partition import init_sharded
from qwenjax.sharding import activate, logical_to_spec, make_mesh
from qwenjax.train.loss import Batch
from qwenjax.train.metrics import flops_per_token, measure_peak_flops
from qwenjax.train.optimizer import make_optimizer
from qwenjax.train.step import init_train_state, make_train_step

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def bench(name: str, overrides: list[str], steps: int, peak: float) -> dict:
    exp = load_experiment(os.path.join(ROOT, "experiments", "main.yaml"), overrides)
    cfg = exp.model_config()
    mesh = make_mesh(exp.mesh.shape(), jax.devices()[: np.prod(list(exp.mesh.shape().values()))])
    graphdef, params = init_sharded(cfg, mesh, None, exp.seed)
    tx = make_optimizer(exp.optimizer, exp.steps, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        init_train_state(params, tx),
    )
    spec = PartitionSpec(None, logical_to_spec(("batch",), None, mesh)[0], None)
    B, T = exp.batch_size, exp.data.seq_len
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (1, B, T + 1)).astype(np.int32)
    batch = Batch(
        input_ids=ids[..., :-1], targets=ids[..., 1:], loss_mask=np.ones((1, B, T), np.float32),
        positions=np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy(),
        segment_ids=np.ones((1, B, T), np.int32),
    )
    batch = jax.device_put(batch, NamedSharding(mesh, spec))
    step = make_train_step(graphdef, tx, aux_weight=exp.aux_loss_weight, z_weight=0.0)
    with activate(mesh):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    tok_s = B * T / statistics.median(times)
    return {"name": name, "mesh": exp.mesh.shape(), "batch": B, "seq": T,
            "params": sum(x.size for x in jax.tree.leaves(params)),
            "step_s": round(statistics.median(times), 4), "tokens_per_s": round(tok_s, 1),
            "mfu": round(tok_s * flops_per_token(cfg, T) / peak, 4), "compile_s": round(compile_s, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    peak = measure_peak_flops(n=1024, seconds=1.0)  # one device; CPU devices share the cores
    runs = [
        bench("main_job", [], args.steps, peak),
        bench("larger_cpu", ["mesh.data=1", "mesh.expert=1", "batch_size=8", "data.seq_len=512",
                             "model_overrides.hidden_size=256", "model_overrides.num_layers=6",
                             "model_overrides.moe_intermediate_size=256"], args.steps, peak),
    ]
    print(json.dumps({"bench": "train", "matmul_peak_gflop_s": round(peak / 1e9, 1),
                      "jax": jax.__version__, "runs": runs}))


if __name__ == "__main__":
    main()
