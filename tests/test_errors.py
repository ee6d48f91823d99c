"""Bad checkpoints and failed writes: one clear error naming the problem, nothing left behind."""

import os
import subprocess
import sys

import hf_models
import numpy as np
import pytest

import qwenjax
from qwenjax.hf import convert
from qwenjax.hf.safetensors_io import PlannedTensor, index_checkpoint, read_tensor, write_shard


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    hf = hf_models.build("qwen3_moe", hf_models.CASES["qwen3_moe"][0][1])
    return hf_models.save(hf, tmp_path_factory.mktemp("good") / "hf")


def _rewrite(src, dst, edit):
    """Copy an HF dir with its tensors passed through `edit(dict) -> dict`."""
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    tensors = edit({n: read_tensor(i) for n, i in index_checkpoint(src).items()})
    names = sorted(tensors)
    write_shard(os.path.join(dst, "model.safetensors"),
                [PlannedTensor(n, tensors[n].shape, tensors[n].dtype) for n in names],
                (tensors[n] for n in names))
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_named(good_dir, tmp_path):
    def edit(t):
        del t["model.layers.1.self_attn.k_proj.weight"]
        t["model.layers.0.mlp.bogus.weight"] = np.zeros((2, 2), np.float32)
        t["model.norm.weight"] = np.zeros((3,), np.float32)
        return t

    bad = _rewrite(good_dir, tmp_path / "bad", edit)
    with pytest.raises(qwenjax.ConversionError) as err:
        qwenjax.from_pretrained(bad)
    msg = str(err.value)
    assert "missing tensors: model.layers.1.self_attn.k_proj.weight" in msg
    assert "unexpected tensors: model.layers.0.mlp.bogus.weight" in msg
    assert "mis-shaped tensors: model.norm.weight [3] (expected [64])" in msg


def test_truncated_file_is_named(good_dir, tmp_path):
    bad = _rewrite(good_dir, tmp_path / "bad", lambda t: t)
    path = bad / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(qwenjax.ConversionError, match="truncated.*model.norm.weight|truncated.*lm_head"):
        qwenjax.from_pretrained(bad)


def test_failed_export_keeps_the_old_directory(good_dir, tmp_path, monkeypatch):
    model = qwenjax.from_pretrained(good_dir)
    out = qwenjax.save_pretrained(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(path, tensors, arrays):
        next(iter(arrays))
        raise OSError("disk full")

    monkeypatch.setattr(convert, "write_shard", boom)
    with pytest.raises(OSError, match="disk full"):
        qwenjax.save_pretrained(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qwenjax.cli", *args], check=False,
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_bad_checkpoint_exits_2_with_one_line_and_writes_nothing(good_dir, tmp_path):
    bad = _rewrite(good_dir, tmp_path / "bad",
                   lambda t: {k: v for k, v in t.items() if k != "model.embed_tokens.weight"})
    existing = tmp_path / "ckpt"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    # --overwrite: the non-empty target would be refused first; the bad source must still fail
    # before anything there changes.
    r = _cli("import-hf", str(bad), str(existing), "--overwrite")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing tensors: model.embed_tokens.weight" in lines[0], r.stderr
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ckpt"]


def test_cli_import_then_export_round_trip(good_dir, tmp_path):
    assert _cli("import-hf", good_dir, str(tmp_path / "ckpt")).returncode == 0
    r = _cli("export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--max-shard-size", "100KB")
    assert r.returncode == 0, r.stderr
    a, b = index_checkpoint(good_dir), index_checkpoint(tmp_path / "hf")
    assert sorted(a) == sorted(b)
    assert all(read_tensor(a[n]).tobytes() == read_tensor(b[n]).tobytes() for n in a)
    r = _cli("export-hf", str(tmp_path / "nothing"), str(tmp_path / "hf2"))
    assert r.returncode == 2 and "not a qwenjax parameter checkpoint" in r.stderr
