"""The training run end to end: metrics, checkpoints, exact resume after kill -9, export, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from qwenjax.experiment import OptimizerConfig, load_experiment
from qwenjax.train.loss import batch_from_tokens
from qwenjax.train.optimizer import make_optimizer
from qwenjax.train.step import init_train_state, make_train_step, split_model

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "experiments" / "tiny_test.yaml")


def _train(run_dir, *sets, wait=True):
    cmd = [sys.executable, "-m", "qwenjax.cli", "train", TINY, "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, check=False, capture_output=True, text=True)


def _losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    r = _train(run, "log_every=1", "steps=10", "checkpoint.every=3")
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def test_run_writes_metrics_checkpoints_and_a_loadable_export(reference_run):
    losses = _losses(reference_run)
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1] - 0.3  # it learns
    assert (reference_run / "config.yaml").exists()
    assert any((reference_run / "tensorboard").iterdir())
    steps = sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [9, 10]  # keep=2
    import torch
    import transformers

    hf_dir = reference_run / "hf"
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = tok("def main():\n    return 1", return_tensors="pt").input_ids
    ours = qwenjax.from_pretrained(hf_dir)
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    out = np.asarray(ours(jnp.asarray(ids.numpy())))
    assert np.abs(out - ref).max() <= 1e-4


def test_same_seed_same_losses_and_exact_resume_after_kill(reference_run, tmp_path):
    ref = _losses(reference_run)
    run = tmp_path / "run"
    for trial, kill_after in enumerate((4, 7)):
        proc = _train(run, "log_every=1", "steps=10", "checkpoint.every=3", wait=False)
        deadline = time.time() + 120
        while time.time() < deadline:
            if (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= kill_after:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = _train(run, "log_every=1", "steps=10", "checkpoint.every=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step" in r.stderr
    # After two kills each step is logged once (the resumed run drops the rows after its
    # checkpoint before replaying them), with the uninterrupted run's loss, bit for bit.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 11))
    for row in rows:
        assert row["loss"] == ref[row["step"]], row["step"]


# Runs the CLI with Orbax's final rename of one step's directory held back: the step's data is
# written to its temporary directory, a marker file names that directory, and the save never
# completes, so the test can kill the process at exactly that point.
_HELD_SAVE = """
import asyncio, sys
from pathlib import Path
from orbax.checkpoint._src.path import atomicity
step, marker = sys.argv[1], Path(sys.argv[2])
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def held(self):
    if self.get_final().name == step:
        marker.write_text(str(self.get()))
        await asyncio.sleep(3600)
    await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = held
from qwenjax.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_kill_during_an_async_save_resumes_from_the_previous_step(reference_run, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "in_flight"
    # The reference run's schedule; no export or sample, which the losses do not depend on.
    sets = ("log_every=1", "steps=10", "checkpoint.every=3", "export_hf=false", "sample_tokens=0")
    cmd = [sys.executable, "-c", _HELD_SAVE, "6", str(marker), "train", TINY, "--run-dir", str(run)]
    cmd += [arg for s in sets for arg in ("--set", s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.02)
    assert marker.exists(), proc.communicate()[1][-2000:] if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    in_flight = Path(marker.read_text())
    assert in_flight.is_dir() and in_flight.name.startswith("6.")  # Orbax's temporary directory
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3]
    r = _train(run, *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step 3 " in r.stderr and "cannot be restored" not in r.stderr
    ref = _losses(reference_run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 10
    for row in rows:
        assert row["loss"] == ref[row["step"]], row["step"]
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [9, 10]
    assert not in_flight.exists()  # the interrupted save's temporary directory is cleaned up


def test_truncated_latest_checkpoint_is_skipped_with_a_warning(reference_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    latest = run / "checkpoints" / "10"
    # A torn OCDBT manifest: Orbax's failed restore leaves TensorStore callbacks that used to
    # print ~30 "Event loop is closed" tracebacks.
    for victim in latest.rglob("manifest.ocdbt"):
        os.truncate(victim, victim.stat().st_size // 2)
    r = _train(run, "log_every=1", "steps=10", "checkpoint.every=3")
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint step 10 cannot be restored" in warnings[0]
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr
    assert "resumed from step 9" in r.stderr
    # Moved aside, and step 10 saved again: the next run has nothing to redo.
    assert [p.name.split("-")[0] for p in (run / "checkpoints" / "damaged").iterdir()] == ["10"]
    r = _train(run, "log_every=1", "steps=10", "checkpoint.every=3")
    assert r.returncode == 0 and "resumed from step 10 " in r.stderr and "warning" not in r.stderr


@pytest.mark.parametrize("sets,message", [
    (["optimizr.lr=1"], "unknown key optimizr; did you mean 'optimizer'?"),
    (["steps=ten"], "steps must be int"),
    (["mesh.data=3", "batch_size=12"], "needs 12 devices but 8 are available"),
    (["batch_size=6"], "not divisible by the batch axes"),
    (["mesh.context=2", "mesh.data=1", "data.seq_len=33"], "data.seq_len: sequence length 33 is not divisible by 4"),
])
def test_config_errors_exit_2_with_one_line_and_touch_nothing(reference_run, tmp_path, sets, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("precious")
    r = _train(run, *sets)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
    assert (run / "config.yaml").read_text() == "precious"


def test_grad_accumulation_equals_one_big_batch():
    cfg = qwenjax.load_preset("qwen3-moe-tiny").replace(num_layers=2)
    graphdef, params = split_model(qwenjax.init_model(cfg))
    tx = make_optimizer(OptimizerConfig(), 10, params)
    batch = batch_from_tokens(jnp.asarray(np.random.RandomState(0).randint(0, 512, (8, 33))))
    results = []
    for accum in (1, 4):
        state = init_train_state(jax.tree.map(jnp.copy, params), tx)
        micro = jax.tree.map(lambda x, accum=accum: x.reshape(accum, 8 // accum, *x.shape[1:]), batch)
        step = make_train_step(graphdef, tx, aux_weight=0.0, z_weight=0.0)
        new, metrics = step(state, micro)
        results.append((new, metrics))
    (a, ma), (b, mb) = results
    assert abs(float(ma["loss"] - mb["loss"])) <= 1e-6
    assert abs(float(ma["grad_norm"] - mb["grad_norm"])) <= 1e-6 * float(ma["grad_norm"])
    diff = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a.params, b.params)
    assert max(jax.tree.leaves(diff)) <= 1e-6


def test_experiment_base_inheritance_and_overrides():
    exp = load_experiment(TINY, ["optimizer.lr=0.01", "model_overrides.num_layers=3"])
    assert exp.steps == 8 and exp.mesh.expert == 4  # from tiny_test and its base main.yaml
    assert exp.optimizer.lr == 0.01 and exp.model_config().num_layers == 3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(run_dir, *sets):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cmd = [sys.executable, "-m", "qwenjax.cli", "train", TINY, "--run-dir", str(run_dir),
           "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    for s in sets:
        cmd += ["--set", s]
    return [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one(reference_run, tmp_path):
    """2 processes x 4 CPU devices (same global mesh data=2 x expert=4): killed after step 5,
    resumed from the step-3 checkpoint, and every logged loss equals the one-process run's."""
    run = tmp_path / "run"
    sets = ("log_every=1", "steps=10", "checkpoint.every=3")
    procs = _launch_two_processes(run, *sets)
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= 5
    ):
        time.sleep(0.1)
    for p in procs:
        p.kill()
        p.wait()
    procs = _launch_two_processes(run, *sets)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "resumed from step" in outs[0][1]
    ref = _losses(reference_run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 10
    for row in rows:
        assert abs(row["loss"] - ref[row["step"]]) <= 1e-5, row["step"]


def test_non_finite_steps_are_skipped_and_counted():
    cfg = qwenjax.load_preset("qwen3-moe-tiny").replace(num_layers=1)
    graphdef, params = split_model(qwenjax.init_model(cfg))
    tx = make_optimizer(OptimizerConfig(), 10, params)
    batch = jax.tree.map(lambda x: x[None], batch_from_tokens(
        jnp.asarray(np.random.RandomState(0).randint(0, 512, (2, 17)))))
    poisoned = jax.tree.map(jnp.copy, params)
    poisoned["final_norm"]["weight"].set_value(jnp.full((cfg.hidden_size,), jnp.nan))
    state = init_train_state(poisoned, tx)
    before = jax.tree.map(np.asarray, state.params)
    step = make_train_step(graphdef, tx, aux_weight=0.0, z_weight=0.0)
    for expected_bad in (1, 2):
        state, metrics = step(state, batch)
        assert not bool(metrics["finite"]) and int(state.bad_steps) == expected_bad
    assert int(state.skipped) == 2 and int(state.step) == 2
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b, equal_nan=True),
                        state.params, before)
    assert all(jax.tree.leaves(same))


def test_sigterm_saves_a_checkpoint_the_next_run_resumes(tmp_path):
    run = tmp_path / "run"
    sets = ("log_every=1", "steps=12", "checkpoint.every=100")
    proc = _train(run, *sets, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = int(err.split("saved step ")[1].split(",")[0])
    assert (run / "checkpoints" / str(saved)).exists()
    r = _train(run, *sets)
    assert r.returncode == 0 and f"resumed from step {saved}" in r.stderr


def test_launch_tpu_dry_run_and_mesh_check():
    tool = [sys.executable, str(ROOT / "tools" / "launch_tpu.py"), str(ROOT / "experiments" / "main.yaml"),
            "--name", "qj", "--zone", "us-east5-a", "--project", "p", "--run-dir", "gs://b/r", "--dry-run"]
    r = subprocess.run(tool + ["--tpu", "v5p-16"], check=False, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 4
    assert "tpu-vm create qj --accelerator-type v5p-16" in lines[0]
    assert "--worker=all" in lines[3] and "qwenjax train experiments/main.yaml --distributed" in lines[3]
    r = subprocess.run(tool + ["--tpu", "v6e-4"], check=False, capture_output=True, text=True)
    assert r.returncode == 2 and "has 8 devices but v6e-4 has 4 chips" in r.stderr
