"""Host memory of a streaming import stays within
    final parameter bytes + 2 x the largest single tensor + a fixed overhead,
measured as the peak RSS (VmHWM) of a fresh subprocess over its RSS just before the import."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qwenjax.config import ModelConfig
from qwenjax.hf.names import tensor_table
from qwenjax.hf.safetensors_io import PlannedTensor, plan_shards, write_shard

FIXED_OVERHEAD = 120 * 2**20  # jit-compiled update functions, allocator slack, Python objects

CFG = ModelConfig(  # ~79M parameters, 318 MB in fp32
    model_type="qwen3", vocab_size=16000, hidden_size=1024, num_layers=4, num_heads=8,
    num_kv_heads=4, head_dim=128, intermediate_size=2816, qk_norm=True,
)

MEASURE = """
import json, sys, psutil, jax, jax.numpy as jnp
import qwenjax
jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(4)))  # runtime up before the baseline
before = psutil.Process().memory_info().rss
model = qwenjax.from_pretrained(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(model))
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child forked from a large
# pytest process would report the parent's peak. VmHWM belongs to this process's own memory.
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
            if line.startswith("VmHWM:"))
import os
print(json.dumps({"before": before, "peak": peak,
                  "env": {k: v for k, v in os.environ.items() if k.startswith(("JAX", "XLA", "OMP", "MALLOC"))}}))
"""


@pytest.mark.slow
def test_import_peak_rss_is_bounded(tmp_path):
    table = tensor_table(CFG)
    planned = [PlannedTensor(t.hf_name, t.hf_shape, np.dtype(np.float32)) for t in table]
    total = sum(p.nbytes for p in planned)
    largest = max(p.nbytes for p in planned)
    assert total >= 200 * 10**6
    rng = np.random.default_rng(0)
    shards = plan_shards(planned, 120 * 10**6)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        arrays = (rng.standard_normal(p.shape, dtype=np.float32) * 0.02 for p in shard)
        write_shard(tmp_path / name, shard, arrays)
    index = {"weight_map": {p.name: n for n, s in zip(names, shards) for p in s}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_config()))

    # A clean environment: nothing the rest of the suite set (XLA flags, thread settings) leaks in.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True,
                         text=True, env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["before"]
    bound = total + 2 * largest + FIXED_OVERHEAD
    print(f"import grew RSS by {grown / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB "
          f"(params {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB), env {r['env']}")
    assert grown <= bound
