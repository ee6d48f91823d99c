"""Checkpoints heal: a damaged step is moved to checkpoints/damaged/ (kept byte for byte) with one
warning line and no traceback, the run goes on from the newest good step and saves that step
number again; metrics.jsonl holds each step once after any number of resumes; a run directory
that lost its config.yaml only takes the model its checkpoints hold."""

import json
import os
import shutil
from pathlib import Path

import pytest

from qwenjax.cli import main
from qwenjax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "experiments" / "tiny_test.yaml")
SETS = ("steps=4", "checkpoint.every=2", "log_every=1", "export_hf=false", "sample_tokens=0")


def _train(capsys, run_dir, *extra) -> tuple[int, str]:
    argv = ["train", TINY, "--run-dir", str(run_dir)]
    for s in SETS + extra:
        argv += ["--set", s]
    code = main(argv)
    return code, capsys.readouterr().err


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def _damage(step_dir: Path) -> None:
    """Truncate the largest array file of a step to half."""
    victim = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)


def _metric_rows(run: Path) -> list[dict]:
    """Every line of metrics.jsonl, parsed: a torn or repeated row fails the test."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    assert (
        main(["train", TINY, "--run-dir", str(run)] + [a for s in SETS for a in ("--set", s)]) == 0
    )
    assert _steps(run) == [2, 4]
    return run, {r["step"]: r["loss"] for r in _metric_rows(run)}


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("damaged", [[4], [2, 4]], ids=["newest", "all"])
def test_damaged_steps_are_set_aside_and_the_rerun_saves_complete_ones(
    reference, tmp_path, capsys, damaged
):
    ref_run, ref_losses = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    for step in damaged:
        _damage(run / "checkpoints" / str(step))
    kept = {s: _snapshot(run / "checkpoints" / str(s)) for s in damaged}

    code, err = _train(capsys, run)
    assert code == 0, err[-2000:]
    warnings = _warnings(err)
    assert len(warnings) == len(damaged), warnings
    for line, step in zip(warnings, sorted(damaged, reverse=True)):
        assert line.startswith(f"warning: checkpoint step {step} cannot be restored (")
        assert f"moved to {run / 'checkpoints' / 'damaged' / str(step)}-" in line
    assert "Traceback" not in err and "Event loop is closed" not in err
    assert ("resumed from step 2" in err) == (damaged == [4])
    aside = sorted((run / "checkpoints" / "damaged").iterdir())
    assert [p.name.split("-")[0] for p in aside] == [str(s) for s in sorted(damaged)]
    for p in aside:  # kept as they were, byte for byte
        assert _snapshot(p) == kept[int(p.name.split("-")[0])]
    assert _steps(run) == [2, 4]
    rows = _metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] == ref_losses[r["step"]] for r in rows)

    code, err = _train(capsys, run)  # the saved final step is complete: nothing to redo
    assert code == 0 and "resumed from step 4 " in err and _warnings(err) == [], err[-2000:]
    assert [r["step"] for r in _metric_rows(run)] == [1, 2, 3, 4]


def test_metrics_hold_each_step_once_after_two_interrupted_runs(reference, tmp_path, capsys):
    ref_run, ref_losses = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    for _ in range(2):
        # What a kill after logging step 4 but before its checkpoint leaves: rows 3 and 4 with
        # no step-4 checkpoint, and a row torn in the middle.
        shutil.rmtree(run / "checkpoints" / "4")
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 5, "loss": 1.')
        code, err = _train(capsys, run)
        assert code == 0 and "resumed from step 2 " in err, err[-2000:]
        rows = _metric_rows(run)
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert all(r["loss"] == ref_losses[r["step"]] for r in rows)
    assert read_metrics(run) == rows


def test_run_dir_without_config_yaml_takes_only_its_checkpoints_model(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    (run / "config.yaml").unlink()
    before = _snapshot(run)
    code, err = _train(capsys, run, "model_overrides.num_layers=1")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "has no config.yaml and its checkpoints hold a different model" in lines[0]
    assert _snapshot(run) == before
    code, err = _train(capsys, run)  # the experiment that wrote them
    assert code == 0 and "resumed from step 4 " in err, err[-2000:]
    assert (run / "config.yaml").is_file()
