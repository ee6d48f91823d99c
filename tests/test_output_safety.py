"""Output directories (qwenjax.atomic.output_dir): nothing the user had is lost, every refusal is
one line with exit status 2, and the bytes on disk are the same before and after it."""

import json
import os
import stat
from pathlib import Path

import pytest

import qwenjax
from qwenjax import atomic
from qwenjax.atomic import MARKER, output_dir, read_marker
from qwenjax.cli import main
from qwenjax.data.tokenizer import train_bpe
from qwenjax.train.checkpoint import save_params


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or `root` itself if a file) -> its bytes."""
    root = Path(root)
    if root.is_file():
        return {".": root.read_bytes()}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [
        line
        for line in err.splitlines()
        if line.strip()
        and "\r" not in line
        and not line.startswith(("loaded ", "wrote ", "export shard", "import "))
    ]


@pytest.fixture(scope="module")
def model():
    cfg = qwenjax.load_preset("qwen3-tiny").replace(num_layers=1)
    return qwenjax.init_model(cfg)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    return save_params(model, tmp_path_factory.mktemp("ckpt") / "params")


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in Path(path).parent.iterdir())


def test_export_into_a_foreign_non_empty_dir_is_refused_then_overwritten_on_request(
    ckpt, tmp_path, capsys
):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = _snapshot(out)
    code, lines = _run(capsys, "export-hf", ckpt, out)
    assert code == 2 and len(lines) == 1, lines
    assert "is not empty and is not a qwenjax output" in lines[0] and "--overwrite" in lines[0]
    assert _snapshot(out) == before and _siblings(out) == ["hf"]  # no temporary left beside it
    code, lines = _run(capsys, "export-hf", ckpt, out, "--overwrite")
    assert code == 0 and lines == [], lines
    assert sorted(_snapshot(out)) == [MARKER, "config.json", "model.safetensors"]
    assert read_marker(out)["kind"] == "hf-model" and _siblings(out) == ["hf"]


def test_re_export_keeps_user_files_and_drops_the_old_exports_own(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _run(capsys, "export-hf", ckpt, out, "--max-shard-size", "100KB")[0] == 0
    old = set(_snapshot(out))
    assert "model.safetensors.index.json" in old and len(old) >= 5  # sharded
    (out / "tokenizer.json").write_text('{"user": "file"}')
    (out / "extra").mkdir()
    (out / "extra" / "README.md").write_bytes(b"\x00user bytes")
    code, lines = _run(capsys, "export-hf", ckpt, out)  # one shard now: a different file set
    assert code == 0 and lines == [], lines
    after = _snapshot(out)
    assert sorted(after) == [
        MARKER,
        "config.json",
        "extra/README.md",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert after["tokenizer.json"] == b'{"user": "file"}'
    assert after["extra/README.md"] == b"\x00user bytes"
    assert read_marker(out)["files"] == ["config.json", "model.safetensors"]
    assert _siblings(out) == ["hf"]


def test_a_user_file_named_like_a_new_output_file_is_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _run(capsys, "export-hf", ckpt, out, "--max-shard-size", "100KB")[0] == 0
    (out / "model.safetensors").write_bytes(b"mine")  # the next export writes this name
    before = _snapshot(out)
    code, lines = _run(capsys, "export-hf", ckpt, out)
    assert code == 2 and len(lines) == 1, lines
    assert "model.safetensors was not written by qwenjax" in lines[0]
    assert _snapshot(out) == before and _siblings(out) == ["hf"]


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_output_equal_to_inside_or_around_its_input_is_refused(ckpt, tmp_path, capsys, where):
    target = {"same": ckpt, "inside": ckpt / "hf", "around": ckpt.parent}[where]
    before = _snapshot(ckpt.parent)
    code, lines = _run(capsys, "export-hf", ckpt, target, "--overwrite")
    assert code == 2 and len(lines) == 1, lines
    assert ("inside its own input" if where != "around" else "contains its input") in lines[0]
    assert _snapshot(ckpt.parent) == before


def test_output_path_that_is_a_file_is_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "model.bin"
    out.write_bytes(b"\x01\x02 not a directory")
    code, lines = _run(capsys, "export-hf", ckpt, out)
    assert code == 2 and len(lines) == 1 and "exists and is not a directory" in lines[0], lines
    assert out.read_bytes() == b"\x01\x02 not a directory" and _siblings(out) == ["model.bin"]


def test_output_under_a_regular_file_is_refused(ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, lines = _run(capsys, "export-hf", ckpt, blocker / "sub" / "hf")
    assert code == 2 and len(lines) == 1, lines
    assert f"{blocker} is not a directory" in lines[0]
    assert blocker.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_in_a_read_only_directory_is_refused(ckpt, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, lines = _run(capsys, "export-hf", ckpt, parent / "hf")
        assert code == 2 and len(lines) == 1 and "is not writable" in lines[0], lines
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o755)


def test_import_into_a_dir_of_another_kind_or_with_user_files_is_refused(model, tmp_path, capsys):
    hf = qwenjax.save_pretrained(model, tmp_path / "hf")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("a,b\n1,2\n")
    before = _snapshot(tmp_path)
    for target, message in (
        (tmp_path / "mine", "is not a qwenjax output"),
        (tmp_path / "hf2", None),
    ):
        if message is None:  # an export is not a parameter checkpoint
            qwenjax.save_pretrained(model, target)
            before = _snapshot(tmp_path)
            message = "is a qwenjax 'hf-model' output (expected 'params')"
        code, lines = _run(capsys, "import-hf", hf, target)
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
        assert _snapshot(tmp_path) == before


def test_python_api_raises_output_error_and_keeps_the_directory(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(qwenjax.OutputError, match="not a qwenjax output"):
        qwenjax.save_pretrained(model, out)
    with pytest.raises(qwenjax.OutputError, match="not a qwenjax output"):
        save_params(model, out)
    assert _snapshot(out) == {"keep.txt": b"precious"}
    qwenjax.save_pretrained(model, out, overwrite=True)
    assert "keep.txt" not in _snapshot(out) and (out / "config.json").is_file()


def test_export_permissions_follow_the_umask(model, tmp_path):
    tokenizer = train_bpe(["def f(x):\n    return x + 1\n"] * 20, 300)
    old = os.umask(0o022)
    try:
        out = qwenjax.save_pretrained(model, tmp_path / "a" / "hf", tokenizer=tokenizer)
        ckpt = save_params(model, tmp_path / "ckpt")
    finally:
        os.umask(old)
    modes = {
        p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for root in (tmp_path / "a", out, ckpt)
        for p in [root, *root.rglob("*")]
    }
    assert {
        "a/hf/tokenizer.json",
        "a/hf/tokenizer_config.json",
        "a/hf/model.safetensors",
        "ckpt/model_config.json",
    } <= set(modes)
    wrong = {
        p: oct(m) for p, m in modes.items() if m != (0o755 if (tmp_path / p).is_dir() else 0o644)
    }
    assert wrong == {}


def test_a_failed_rename_leaves_the_target_and_no_temporary(model, tmp_path, monkeypatch):
    out = qwenjax.save_pretrained(model, tmp_path / "hf")
    (out / "user.txt").write_text("mine")
    before = _snapshot(out)
    real_rename = os.rename

    def failing(src, dst):
        if Path(src).name.startswith(".hf.tmp-") and Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", failing)
    with pytest.raises(qwenjax.OutputError, match="No space left on device"):
        qwenjax.save_pretrained(model, out)
    assert _snapshot(out) == before and _siblings(out) == ["hf"]


def test_marker_is_written_last_and_lists_what_was_written(tmp_path):
    with output_dir(tmp_path / "report", "eval-report") as tmp:
        (tmp / "results.json").write_text("{}")
        (tmp / "plots").mkdir()
        (tmp / "plots" / "a.png").write_bytes(b"png")
        assert not (tmp / MARKER).exists()
    marker = json.loads((tmp_path / "report" / MARKER).read_text())
    assert marker["kind"] == "eval-report"
    assert marker["files"] == ["plots/a.png", "results.json"]


def test_tokenizer_files_survive_import_export_and_re_export(model, tmp_path, capsys):
    tokenizer = train_bpe(["def f(x):\n    return x + 1\n"] * 20, 300)
    hf = qwenjax.save_pretrained(model, tmp_path / "hf", tokenizer=tokenizer)
    tok_bytes = {n: (hf / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}
    assert _run(capsys, "import-hf", hf, tmp_path / "ckpt")[0] == 0
    out = tmp_path / "out"
    for _ in range(2):  # the second export replaces the first, tokenizer and all
        code, lines = _run(capsys, "export-hf", tmp_path / "ckpt", out)
        assert code == 0 and lines == [], lines
        assert {n: (out / n).read_bytes() for n in tok_bytes} == tok_bytes
    assert _snapshot(tmp_path / "hf") == _snapshot(hf)  # the source is untouched


def _write(target: Path, files: dict[str, str]) -> None:
    with output_dir(target, "report") as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def test_a_marker_naming_paths_outside_the_output_deletes_nothing_there(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    _write(out, {"a.txt": "1"})
    victim.write_text("precious")
    marker = json.loads((out / MARKER).read_text())
    marker["files"] += ["../victim.txt", str(victim)]
    (out / MARKER).write_text(json.dumps(marker))
    assert read_marker(out) is None  # an edited marker is not trusted: the dir is foreign now
    with pytest.raises(qwenjax.OutputError):
        _write(out, {"a.txt": "2"})
    assert victim.read_text() == "precious" and (out / "a.txt").read_text() == "1"


def test_user_files_that_cannot_be_put_back_are_rescued_not_deleted(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, {"a.txt": "1"})
    (out / "mine.txt").write_text("user data")
    real_rename = os.rename

    def failing(src, dst):  # the swap fails, and so does every way back into `out`
        into_out = out.resolve() in (Path(dst).resolve(), Path(dst).parent.resolve())
        if into_out and (Path(src).name != "mine.txt" or ".tmp-" in str(src)):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", failing)
    with pytest.raises(qwenjax.OutputError):
        _write(out, {"a.txt": "2"})
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    rescued = list(tmp_path.glob(".out.rescued-*"))
    kept = [p for p in [out / "mine.txt", *(r / "mine.txt" for r in rescued)] if p.exists()]
    assert [p.read_text() for p in kept] == ["user data"]
