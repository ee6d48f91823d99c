"""Run metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard event files and a
one-line console progress report with throughput, MFU and ETA.

Each step appears once in metrics.jsonl however often the run resumed: a resumed run first
drops the rows after the step it restored (rewriting the file atomically), then appends the
replayed steps; TensorBoard purges the same steps. `read_metrics` is how anything reads the file
(it also skips a last line torn by a kill).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.config import ModelConfig
from qwenjax.paths import append_text, as_path, copy_file, is_url


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (active matmul parameters) + causal attention scores."""
    D, L = cfg.hidden_size, cfg.num_layers
    attn = D * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * D
    mlp = 0
    for kind in cfg.mlp_types:
        if kind == "moe":
            mlp += cfg.num_experts_per_tok * 3 * D * cfg.moe_intermediate_size + D * cfg.num_experts
            mlp += 3 * D * cfg.shared_expert_intermediate_size
        else:
            mlp += 3 * D * cfg.intermediate_size
    matmul_params = L * attn + mlp + D * cfg.vocab_size
    attention_scores = L * cfg.num_heads * cfg.head_dim * seq_len  # QK^T and PV, causal half
    return 6.0 * matmul_params + 6.0 * attention_scores


def measure_peak_flops(n: int = 1024, seconds: float = 0.3) -> float:
    """fp32 matmul FLOP/s of this machine's first device (a quick, rough ceiling for MFU)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        jax.block_until_ready(f(a))
        count += 1
    return 2.0 * n**3 * count / (time.perf_counter() - t0)


def _parse(lines: list[str]) -> list[dict]:
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl`, one per step (the last written wins), by step."""
    path = as_path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step = {r["step"]: r for r in _parse(path.read_text().splitlines())}
    return [by_step[s] for s in sorted(by_step)]


def drop_rows_after(path, step: int) -> int:
    """Keep only the rows of `path` with step <= `step` (the run resumes after it); the file is
    replaced atomically, and only if something goes. The dropped lines are appended to
    `metrics.replaced.jsonl` beside it (a run that fell back past damaged checkpoints keeps
    the history it replays). -> rows dropped."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    rows = _parse(lines)
    kept = [json.dumps(r) for r in rows if r["step"] <= step]
    if len(kept) == len(lines):
        return 0
    dropped = [json.dumps(r) for r in rows if r["step"] > step]
    if dropped:
        append_text(path.with_name("metrics.replaced.jsonl"), "".join(l + "\n" for l in dropped))
    if is_url(path):  # one object is replaced whole
        path.write_text("".join(line + "\n" for line in kept))
        return len(lines) - len(kept)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


class MetricsWriter:
    def __init__(
        self, run_dir, total_steps: int, *, tensorboard: bool = True, start_step: int = 0
    ):
        """`start_step`: the step the run starts after (0, or the restored checkpoint's)."""
        self.path = as_path(run_dir) / "metrics.jsonl"
        self.total = total_steps
        self.t_start = time.perf_counter()
        drop_rows_after(self.path, start_step)
        # An object cannot be appended to: keep its text here and write it whole per row (one
        # request instead of a read and a write).
        self.text = None
        if is_url(self.path):
            self.text = self.path.read_text() if self.path.exists() else ""
        self.tb = None
        # On object storage the event file is written locally and uploaded whole after each
        # flush (tensorboardX's own gs:// writer uploads again when garbage-collected, even at
        # interpreter exit, and needs another client library).
        self.tb_dir = self.path.parent / "tensorboard"
        self.tb_stage = tempfile.mkdtemp(prefix="qwenjax-tb-") if is_url(self.tb_dir) else None
        if tensorboard:
            from tensorboardX import SummaryWriter

            logdir = self.tb_stage or str(self.tb_dir)
            self.tb = SummaryWriter(logdir, purge_step=start_step + 1)

    def write(self, step: int, metrics: dict[str, Any], *, steps_done_this_run: int) -> None:
        row = {"step": step}
        for k, v in metrics.items():
            v = np.asarray(v)
            row[k] = v.item() if v.size == 1 else v.tolist()
        if self.text is None:
            append_text(self.path, json.dumps(row) + "\n")
        else:
            self.text += json.dumps(row) + "\n"
            self.path.write_text(self.text)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
            self._upload_events()
        elapsed = time.perf_counter() - self.t_start
        eta = elapsed / max(steps_done_this_run, 1) * (self.total - step)
        print(
            f"step {step}/{self.total} loss {row['loss']:.4f} gnorm {row['grad_norm']:.3f} "
            f"lr {row['lr']:.2e} tok/s {row.get('tokens_per_s', 0):.0f} "
            f"mfu {100 * row.get('mfu', 0):.1f}% eta {eta:.0f}s",
            file=sys.stderr, flush=True,
        )

    def _upload_events(self) -> None:
        if self.tb_stage is not None:
            for name in sorted(os.listdir(self.tb_stage)):
                copy_file(os.path.join(self.tb_stage, name), self.tb_dir / name)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self._upload_events()
        if self.tb_stage is not None:
            shutil.rmtree(self.tb_stage, ignore_errors=True)
