"""Bad input of every kind ends in one line `qwenjax: error: ...` and exit status 2 (the Python
API raises the same QwenJaxError kinds), checked before anything is written; a command that
fails after creating its run directory takes it back, so the corrected command is accepted."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import qwenjax
from qwenjax.cli import main
from qwenjax.hf.safetensors_io import PlannedTensor, index_checkpoint, read_tensor, write_shard

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "experiments" / "tiny_test.yaml")
FAST = ["export_hf=false", "sample_tokens=0"]


def _run(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def _train_argv(run_dir, *sets):
    argv = ["train", TINY, "--run-dir", run_dir]
    for s in sets:
        argv += ["--set", s]
    return argv


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def model():
    return qwenjax.init_model(qwenjax.load_preset("qwen3-tiny").replace(num_layers=1))


@pytest.mark.parametrize(
    "sets,message",
    [
        (["mesh.data=0"], "mesh.data must be an integer >= 1, got 0"),
        (["checkpoint.every=0"], "checkpoint.every and checkpoint.keep must be >= 1"),
        (["checkpoint.keep=0"], "checkpoint.every and checkpoint.keep must be >= 1"),
        (["log_every=0"], "log_every and max_bad_steps must be >= 1"),
        (["sample_tokens=-1"], "sample_tokens must be >= 0"),
    ],
)
def test_zero_and_negative_settings_exit_2_and_touch_nothing(tmp_path, capsys, sets, message):
    run = tmp_path / "run"
    code, lines = _run(capsys, *_train_argv(run, *sets))
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith("qwenjax: error: ") and not run.exists()


def test_run_dir_that_is_a_file_or_holds_malformed_yaml(tmp_path, capsys):
    as_file = tmp_path / "run.txt"
    as_file.write_bytes(b"not a directory\n")
    code, lines = _run(capsys, *_train_argv(as_file, *FAST))
    assert code == 2 and len(lines) == 1 and "is a file" in lines[0], lines
    assert as_file.read_bytes() == b"not a directory\n"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(b"steps: [1, 2\n")
    code, lines = _run(capsys, *_train_argv(run, *FAST))
    assert code == 2 and len(lines) == 1 and "config.yaml: not valid YAML" in lines[0], lines
    assert _snapshot(run) == {"config.yaml": b"steps: [1, 2\n"}


def test_failed_first_attempt_leaves_nothing_and_the_fixed_command_runs(tmp_path, capsys):
    # A parameter checkpoint with a config but no params/: found only after the run directory
    # is created and the BPE tokenizer trained in it.
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = qwenjax.load_preset("qwen3-moe-tiny").replace(num_layers=2)
    (broken / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    run = tmp_path / "run"
    code, lines = _run(capsys, *_train_argv(run, *FAST, f"init_from={broken}"))
    assert code == 2 and len(lines) == 1 and "no params/ directory" in lines[0], lines
    assert not run.exists()
    # The same in a directory the user made, holding a file of theirs: only that stays.
    run.mkdir()
    (run / "notes.md").write_bytes(b"plan\n")
    code, lines = _run(capsys, *_train_argv(run, *FAST, f"init_from={broken}"))
    assert code == 2 and len(lines) == 1, lines
    assert _snapshot(run) == {"notes.md": b"plan\n"}
    # The corrected command (no init_from) is not "a different experiment".
    code = main(
        [str(a) for a in _train_argv(run, *FAST, "steps=2", "checkpoint.every=2", "log_every=1")]
    )
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert (run / "checkpoints" / "2").is_dir() and (run / "notes.md").read_bytes() == b"plan\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-k", "-3"], "top_k must be an integer >= 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["--prompt", ""], "--prompt is empty"),
    ],
)
def test_generate_arguments_exit_2_before_loading(tmp_path, capsys, args, message):
    # The model path does not exist: the argument is refused before anything is loaded.
    argv = ["generate", "--hf", tmp_path / "nowhere", "--prompt", "def f("]
    code, lines = _run(capsys, *argv, *args)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -1.0}, "temperature must be a finite number"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_p": math.nan}, "top_p must be in"),
        ({"top_k": -3}, "top_k must be an integer"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
        ({"prompts": [[1, 2], []]}, "prompt 1 is empty"),
        ({"prompts": [[1, 512]]}, "token id 512 is outside the vocabulary [0, 512)"),
        ({"prompts": [[-1, 3]]}, "token id -1 is outside the vocabulary"),
        ({"prompts": [[1.5, 2.0]]}, "token ids must be integers"),
        ({"prompts": ["hello"]}, "prompt 0 is text"),
    ],
)
def test_generate_python_api_raises_qwenjax_errors(model, kwargs, message):
    kwargs = {"prompts": [[1, 2, 3]], **kwargs}
    prompts = kwargs.pop("prompts")
    with pytest.raises(qwenjax.QwenJaxError, match=re.escape(message)):
        qwenjax.generate(model, prompts, **kwargs)
    assert issubclass(qwenjax.GenerationError, ValueError)  # what these were before


def test_make_mesh_refuses_non_integer_sizes():
    for bad in (8.9, 8.0, True, "8", 0):
        with pytest.raises(qwenjax.MeshError, match="must be integers >= 1"):
            qwenjax.make_mesh({"data": bad})
    assert qwenjax.make_mesh({"data": np.int64(8)}).shape["data"] == 8


def _hf_copy(model, tmp_path, edit_config=None, edit_tensors=None) -> Path:
    src = qwenjax.save_pretrained(model, tmp_path / "src")
    dst = tmp_path / "bad"
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    tensors = {n: read_tensor(i) for n, i in index_checkpoint(src).items()}
    tensors = edit_tensors(tensors) if edit_tensors else tensors
    names = sorted(tensors)
    planned = [PlannedTensor(n, tensors[n].shape, tensors[n].dtype) for n in names]
    write_shard(dst / "model.safetensors", planned, (tensors[n] for n in names))
    return dst


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("hidden_size", 64.5, "hidden_size must be an integer, got 64.5"),
        ("num_hidden_layers", "1", "num_hidden_layers must be an integer, got '1'"),
        ("rms_norm_eps", "small", "rms_norm_eps must be a number"),
    ],
)
def test_non_integer_in_hf_config_exits_2(model, tmp_path, capsys, key, value, message):
    bad = _hf_copy(model, tmp_path, edit_config=lambda c: {**c, key: value})
    before = _snapshot(tmp_path)
    code, lines = _run(capsys, "import-hf", bad, tmp_path / "ckpt")
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert _snapshot(tmp_path) == before and not (tmp_path / "ckpt").exists()


def test_integer_tensor_where_a_float_is_expected(model, tmp_path):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
        return t

    bad = _hf_copy(model, tmp_path, edit_tensors=to_int)
    with pytest.raises(qwenjax.ConversionError, match="not floating point: model.norm.weight I32"):
        qwenjax.from_pretrained(bad)
