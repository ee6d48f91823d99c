"""Runs whose directory is `gs://...`, on a local Cloud Storage emulator (offline).

Both clients reach the emulator: gcsfs (etils.epath's gs:// backend: config, metrics,
TensorBoard files, tokenizer, exports, Orbax's directories) and TensorStore (Orbax's arrays, its
own GCS driver), the latter once the emulator sends the `x-goog-generation` header real Cloud
Storage sends; see gcs_emulator.py for how each is pointed at it. Nothing here falls back to
fsspec's in-memory filesystem.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gcs_emulator
import numpy as np
import pytest

from qwenjax.atomic import MARKER, check_output, output_dir, read_marker
from qwenjax.atomic_remote import PENDING, check_complete
from qwenjax.errors import OutputError
from qwenjax.paths import (
    absolute,
    append_text,
    as_path,
    copy_file,
    glob_files,
    is_url,
    move,
    read_range,
    rmtree,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "experiments" / "tiny_test.yaml")
SETS = ("log_every=1", "steps=6", "checkpoint.every=2", "sample_tokens=0")


@pytest.fixture(scope="module")
def bucket():
    with gcs_emulator.emulator() as url:
        yield url


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """{step: loss} of the uninterrupted run, one process, in a local directory."""
    ref_dir = tmp_path_factory.mktemp("ref") / "run"
    r = _train(ref_dir, ref_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return {row["step"]: row["loss"] for row in _rows(ref_dir)}


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _cli(*args, cwd, wait=True):
    cmd = [sys.executable, "-m", "qwenjax.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, check=False)


def _train(run_dir, cwd, *sets, wait=True):
    args = ["train", TINY, "--run-dir", run_dir]
    for s in (*SETS, *sets):
        args += ["--set", s]
    return _cli(*args, cwd=cwd, wait=wait)


def _rows(run_dir) -> list[dict]:
    path = as_path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _names(url) -> list[str]:
    return sorted(p.name for p in as_path(url).iterdir())


def test_a_url_never_becomes_a_local_path(bucket, tmp_path, monkeypatch):
    """What a run writes and reads, called on a gs:// run dir from an empty cwd: the objects
    are in the bucket and the cwd stays empty (`pathlib.Path("gs://b")` would be `gs:/b`)."""
    from qwenjax.data.tokenizer import load_tokenizer, train_bpe
    from qwenjax.train.metrics import MetricsWriter, read_metrics

    assert is_url("gs://b/runs/x") and not is_url("runs/x")
    assert str(as_path("gs://b/runs/x") / "metrics.jsonl") == "gs://b/runs/x/metrics.jsonl"
    assert str(absolute("gs://b/runs/x")) == "gs://b/runs/x"  # not resolved against the cwd
    monkeypatch.chdir(tmp_path)
    run = f"{bucket}/runs/paths"
    writer = MetricsWriter(run, 3)
    for step in (1, 2):
        writer.write(step, {"loss": 1.0 / step, "grad_norm": 0.5, "lr": 0.1},
                     steps_done_this_run=step)
    writer.close()
    MetricsWriter(run, 3, tensorboard=False, start_step=1).close()  # a resume from step 1
    assert [r["step"] for r in read_metrics(run)] == [1]
    replaced = (as_path(run) / "metrics.replaced.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in replaced] == [2]
    assert any(p.name.startswith("events.") for p in (as_path(run) / "tensorboard").iterdir())
    train_bpe(["def f(x):\n    return x\n"] * 20, 300).save(f"{run}/tokenizer")
    assert load_tokenizer(f"{run}/tokenizer").encode("def f") != []
    assert list(tmp_path.iterdir()) == []


def test_output_on_object_storage_marker_last_and_user_files_kept(bucket):
    target = f"{bucket}/outputs/report"
    with output_dir(target, "eval-report") as tmp:
        (tmp / "results.json").write_text("1")
        (tmp / "plots").mkdir()
        (tmp / "plots" / "a.png").write_text("png")
    assert read_marker(target)["files"] == ["plots/a.png", "results.json"]
    assert _names(target) == [MARKER, "plots", "results.json"]
    (as_path(target) / "notes.txt").write_text("mine")

    # A second output of the same kind: its files replace the listed ones, the user's file stays.
    with output_dir(target, "eval-report") as tmp:
        (tmp / "results.json").write_text("2")
    assert _names(target) == [MARKER, "notes.txt", "results.json"]
    assert (as_path(target) / "results.json").read_text() == "2"
    assert (as_path(target) / "notes.txt").read_text() == "mine"

    # A failed writer uploads nothing: the previous output is as it was.
    with pytest.raises(RuntimeError), output_dir(target, "eval-report") as tmp:
        (tmp / "results.json").write_text("3")
        raise RuntimeError("writer failed")
    assert (as_path(target) / "results.json").read_text() == "2"

    # Another kind, or a prefix that is not ours, is refused; the user's file is never deleted.
    with pytest.raises(OutputError, match="expected 'hf-model'"), output_dir(target, "hf-model"):
        pass
    with pytest.raises(OutputError, match="bucket no-such-bucket does not exist"):
        check_output("gs://no-such-bucket/x", "eval-report")


def test_an_upload_cut_short_reads_as_incomplete_and_is_replaced(bucket):
    target = f"{bucket}/outputs/cut"
    with output_dir(target, "hf-model") as tmp:
        (tmp / "config.json").write_text("{}")
    # What a kill during the next upload leaves: the pending marker, no marker, some files.
    root = as_path(target)
    (root / MARKER).unlink()
    (root / PENDING).write_text(json.dumps({"kind": "hf-model", "files": ["config.json", "b"]}))
    (root / "b").write_text("half")
    with pytest.raises(OutputError, match="incomplete qwenjax output"):
        check_complete(target)
    with output_dir(target, "hf-model") as tmp:  # the same command again replaces it
        (tmp / "config.json").write_text('{"a": 1}')
    check_complete(target)
    assert _names(target) == [MARKER, "config.json"]


def test_path_operations_on_object_storage(bucket, tmp_path):
    """The primitives behind set-aside damaged steps (move), undo (rmtree), metrics (append)."""
    step = as_path(f"{bucket}/ops/checkpoints/7")
    (step / "state").mkdir(parents=True, exist_ok=True)
    (step / "state" / "a").write_bytes(b"abc")
    (step / "b").write_text("b")
    move(step, f"{bucket}/ops/checkpoints/damaged/7-x")
    assert not step.exists()
    moved = as_path(f"{bucket}/ops/checkpoints/damaged/7-x")
    assert (moved / "state" / "a").read_bytes() == b"abc" and (moved / "b").read_text() == "b"
    append_text(moved / "log", "1\n")
    append_text(moved / "log", "2\n")
    assert (moved / "log").read_text() == "1\n2\n"
    (tmp_path / "f").write_bytes(b"x" * 1000)
    copy_file(tmp_path / "f", moved / "f")
    assert read_range(moved / "f", 990, 100) == b"x" * 10
    assert [p.name for p in glob_files(f"{bucket}/ops/**/a")] == ["a"]
    rmtree(f"{bucket}/ops")
    assert not as_path(f"{bucket}/ops").exists()


def test_data_globs_on_gcs(bucket):
    from qwenjax.data.corpus import jsonl_files, text_files
    from qwenjax.errors import ConfigError

    for i in range(2):
        rows = [json.dumps({"text": f"doc {i}-{j}"}) for j in range(3)]
        (as_path(f"{bucket}/data/part-{i}.jsonl")).write_text("\n".join(rows) + "\n\n")
    corpus = jsonl_files(f"{bucket}/data/*.jsonl")
    assert len(corpus) == 6
    assert [corpus[i] for i in (0, 4, 5)] == ["doc 0-0", "doc 1-1", "doc 1-2"]
    with pytest.raises(ConfigError, match="matches no files"):
        text_files(f"{bucket}/data/*.txt")


@pytest.mark.slow
def test_train_on_gcs_kill_resume_bit_exact_and_export_round_trip(bucket, local_reference, tmp_path):
    """A gs:// run killed with SIGKILL after step 3 and resumed logs the uninterrupted local
    run's losses bit for bit; its export goes gs:// -> import-hf on gs:// -> export-hf to a
    local directory that transformers loads with the same logits. No process writes a local
    `gs:` directory."""
    ref = local_reference
    run, cwd = f"{bucket}/runs/kill", tmp_path / "cwd"
    cwd.mkdir()
    proc = _train(run, cwd, wait=False)
    committed = as_path(run) / "checkpoints" / "2" / "commit_success.txt"  # Orbax's, on GCS
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
        committed.exists() and max((r["step"] for r in _rows(run)), default=0) >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    r = _train(run, cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step" in r.stderr
    rows = _rows(run)
    assert [row["step"] for row in rows] == list(range(1, 7))
    for row in rows:
        assert row["loss"] == ref[row["step"]], row["step"]
    assert {"config.yaml", "tokenizer", "tensorboard", "checkpoints", "hf"} <= set(_names(run))
    assert read_marker(f"{run}/hf")["kind"] == "hf-model"

    r = _cli("import-hf", f"{run}/hf", f"{bucket}/ckpt/params", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_marker(f"{bucket}/ckpt/params")["kind"] == "params"
    out = tmp_path / "hf_local"
    r = _cli("export-hf", f"{bucket}/ckpt/params", out, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not any(p.name.startswith("gs:") for p in cwd.iterdir())
    assert not any(p.name.startswith("gs:") for p in tmp_path.iterdir())

    import torch
    import transformers

    import qwenjax

    tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = tok("def main():\n    return 1", return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = hf(ids).logits.numpy()
    ours = np.asarray(qwenjax.from_pretrained(out)(ids.numpy()))
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_bad_input_on_gcs_is_one_line_and_exit_2(bucket, tmp_path, case):
    src = f"{bucket}/bad/{case}"
    if case == "truncated":
        import qwenjax

        config = qwenjax.load_preset("qwen3-tiny").to_hf_config()
        (as_path(src) / "config.json").write_text(json.dumps(config))
        (as_path(src) / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    r = _cli("import-hf", src, tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("qwenjax: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert src in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_hosts_that_share_only_the_bucket_train_like_one(bucket, local_reference, tmp_path):
    """2 processes x 4 CPU devices, each in its own empty working directory, with a gs:// run
    dir: host 1 reads the tokenizer host 0 trained from the bucket (after a barrier), Orbax
    writes one checkpoint from both, and the losses are the one-process run's."""
    run = f"{bucket}/runs/two-hosts"
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    sets = [arg for s in SETS for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "qwenjax.cli", "train", TINY, "--run-dir", run, *sets,
           "--distributed", "--coordinator", f"127.0.0.1:{gcs_emulator._free_port()}",
           "--num-processes", "2"]
    cwds = [tmp_path / f"host{i}" for i in range(2)]
    procs = []
    for i, cwd in enumerate(cwds):
        cwd.mkdir()
        procs.append(subprocess.Popen(cmd + ["--process-id", str(i)], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    rows = _rows(run)
    assert [row["step"] for row in rows] == list(range(1, 7))
    for row in rows:
        assert abs(row["loss"] - local_reference[row["step"]]) <= 1e-5, row["step"]
    assert sorted(p.name for p in (as_path(run) / "checkpoints").iterdir()) == ["4", "6"]
    assert [list(cwd.iterdir()) for cwd in cwds] == [[], []]
