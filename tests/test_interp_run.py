"""`qwenjax sae train / export`: a tiny model's site, checkpoints and exact resume, FVU / L0 /
spliced-in loss in metrics.jsonl, the SAELens-format directory; bad input in one line."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

import qwenjax
from qwenjax.cli import main
from qwenjax.data.corpus import stdlib_corpus
from qwenjax.data.tokenizer import train_bpe
from qwenjax.interp import sae as S
from qwenjax.interp.evaluate import spliced_losses
from qwenjax.train.checkpoint import save_params
from qwenjax.train.loss import batch_from_tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae_model")
    tok = train_bpe(stdlib_corpus(40), 512)
    tok.save(root / "tok")
    cfg = qwenjax.load_preset("qwen3-moe-tiny").replace(num_layers=2)
    save_params(qwenjax.init_model(cfg), root / "ckpt",
                extra_files=[root / "tok" / "tokenizer.json", root / "tok" / "tokenizer_config.json"])
    return root / "ckpt"


def experiment(tmp_path, model_dir, **over):
    exp = {"model": {"checkpoint": str(model_dir)}, "site": "blocks.1.resid_post",
           "data": {"source": "stdlib", "seq_len": 32, "max_docs": 40},
           "sae": {"architecture": "topk", "expansion": 2, "k": 8, "dead_tokens": 2048},
           "train_tokens": 4096, "eval_tokens": 512, "model_batch": 8, "batch_size": 256,
           "steps": 20, "log_every": 5, "lr": 0.003, "warmup_steps": 2,
           "checkpoint": {"every": 10, "keep": 3, "async_save": False}, "analyze_latents": 4,
           **over}
    path = tmp_path / "sae.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("sae_run")
    # The disk store: the resumed run below reads its activations back instead of capturing.
    path, run = experiment(root, model_dir, store="disk"), root / "run"
    assert main(["sae", "train", str(path), "--run-dir", str(run)]) == 0
    return path, run


def test_sae_train_evaluates_and_resumes_exactly(tmp_path, trained):
    path, run = trained
    first = load_file(str(run / "sae" / "sae_weights.safetensors"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert final["eval_l0"] == 8.0  # TopK: exactly k latents per token
    assert 0.0 < final["eval_fvu"] < 0.85  # 20 steps on a random model's residual stream
    # (a random model: zero ablation need not hurt, so only the values are checked here; the
    # perfect-reconstruction test below pins the spliced loss itself)
    assert all(np.isfinite(final[k]) for k in ("eval_ce_clean", "eval_ce_spliced",
                                                "eval_ce_zero_ablated"))
    assert 0.0 <= final["eval_dead_fraction"] <= 1.0
    assert json.loads((run / "eval.json").read_text())["eval_fvu"] == final["eval_fvu"]
    # A run stopped after step 10's checkpoint and restarted ends with the same SAE, bit for bit.
    shutil.rmtree(run / "checkpoints" / "20")
    shutil.rmtree(run / "sae")
    shards = sorted((run / "activations").glob("shard-*.npy"))
    assert sum(np.load(f, mmap_mode="r").shape[0] for f in shards) == 4096
    stamps = [f.stat().st_mtime_ns for f in shards]
    assert main(["sae", "train", str(path), "--run-dir", str(run)]) == 0
    again = load_file(str(run / "sae" / "sae_weights.safetensors"))
    assert [f.stat().st_mtime_ns for f in shards] == stamps  # read back, not captured again
    assert all(np.array_equal(first[k], again[k]) for k in first)
    rows2 = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows2] == [5, 10, 15, 20]
    assert rows2[-1]["loss"] == final["loss"]
    # Export: a SAELens directory beside it.
    assert main(["sae", "export", str(run), str(tmp_path / "lens")]) == 0
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8 and cfg["d_sae"] == 256
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"


def test_spliced_loss_of_a_perfect_reconstruction_is_the_clean_loss():
    cfg = qwenjax.load_preset("qwen3-moe-tiny").replace(num_layers=2)
    model = qwenjax.init_model(cfg)
    D = cfg.hidden_size
    # ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly.
    eye = np.eye(D, dtype=np.float32)
    sae_cfg = S.SAEConfig(architecture="relu", d_in=D, d_sae=2 * D)
    params = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * D, np.float32),
              "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(D, np.float32)}
    params = jax.tree.map(jnp.asarray, params)
    tokens = np.random.RandomState(0).randint(0, 512, (4, 33))
    batch = {k: np.asarray(v) for k, v in batch_from_tokens(jnp.asarray(tokens))._asdict().items()}
    for key in [("resid_post", 0), ("attn_out", 1)]:
        out = spliced_losses(model, key, sae_cfg, params, [batch])
        assert abs(out["ce_spliced"] - out["ce_clean"]) <= 1e-6
        assert abs(out["ce_zero_ablated"] - out["ce_clean"]) > 1e-3


def test_bad_sae_input_is_one_line_and_exit_2(tmp_path, model_dir, capsys):
    path = experiment(tmp_path, model_dir, site="blocks.7.resid_post")
    assert main(["sae", "train", str(path), "--run-dir", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of range" in err
    assert not (tmp_path / "r1").exists()
    path = experiment(tmp_path, model_dir, sae={"architecture": "gated"})
    assert main(["sae", "train", str(path)]) == 2
    assert "sae.architecture 'gated'" in capsys.readouterr().err
    path = experiment(tmp_path, model_dir, sae={"k": 5000, "expansion": 2})  # 256 latents
    assert main(["sae", "train", str(path), "--run-dir", str(tmp_path / "r2")]) == 2
    assert "sae.k (5000)" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    path = experiment(tmp_path, model_dir)
    assert main(["sae", "train", str(path), "--run-dir", str(foreign)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


def test_analyze_writes_a_dashboard_page_per_latent(trained, tmp_path):
    _, run = trained
    out = tmp_path / "dash"
    assert main(["sae", "analyze", str(run), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["latents"]) == 4 and summary["tokens"] == 512
    index = (out / "index.html").read_text()
    for f in summary["latents"]:
        page = (out / f"latent_{f}.html").read_text()
        assert f"latent_{f}.html" in index and page.count('class="top"') >= 1
        assert (out / f"latent_{f}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "frequencies.png").stat().st_size > 1000
    assert main(["sae", "analyze", str(run), "--out", str(out)]) == 0  # its own output: replaced


def test_steering_adds_the_decoder_direction_at_the_site(trained, model_dir):
    from flax import nnx

    from qwenjax.interp.capture import forward_with_hooks
    from qwenjax.interp.steer import Steered, steered
    from qwenjax.train.checkpoint import load_params

    _, run = trained
    model = load_params(model_dir)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 512, (2, 16)))
    direction = load_file(str(run / "sae" / "sae_weights.safetensors"))["W_dec"][3]
    assert abs(float(np.linalg.norm(direction)) - 1) <= 1e-5
    # Steer layer 0's output, to see it arrive as layer 1's input.
    s0 = Steered(model, [("resid_post", 0)], [5.0 * direction])
    graphdef, state = nnx.split(s0)

    @jax.jit
    def both(state):
        s = nnx.merge(graphdef, state)
        sites = [("resid_post", 0), ("resid_pre", 1), ("resid_post", 1)]
        _, clean = forward_with_hooks(s.lm, ids, capture=sites)
        with qwenjax.model.hooks.hooks(capture=sites) as h:
            s(ids)
        return clean, h.values

    clean, steer = both(state)
    assert np.array_equal(steer[("resid_post", 0)], clean[("resid_post", 0)])  # before the edit
    assert np.array_equal(steer[("resid_pre", 1)],
                          clean[("resid_post", 0)] + jnp.asarray(5.0 * direction))
    assert not np.array_equal(steer[("resid_post", 1)], clean[("resid_post", 1)])
    # generation: scale 0 is the plain model's output, a large scale changes it
    prompt = [[5, 6, 7, 8]]
    plain = qwenjax.generate(model, prompt, max_new_tokens=6)
    assert qwenjax.generate(steered(model, [f"{run}:3:0"]), prompt, max_new_tokens=6) == plain
    assert qwenjax.generate(steered(model, [f"{run}:3:400"]), prompt, max_new_tokens=6) != plain


def test_bad_steer_and_analyze_input_is_one_line(trained, model_dir, tmp_path, capsys):
    _, run = trained
    argv = ["generate", "--checkpoint", str(model_dir), "--prompt", "def ", "--max-new-tokens", "2"]
    for spec, match in [(f"{run}:999:1", "latent 999"), (f"{run}:x:1", "SAE_DIR:LATENT:SCALE"),
                        (f"{tmp_path}:1:1", "not a qwenjax SAE directory")]:
        assert main(argv + ["--steer", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err
    assert main(["sae", "analyze", str(tmp_path)]) == 2
    assert "not a finished SAE run" in capsys.readouterr().err


def test_disk_store_resumes_and_equals_in_memory_capture(model_dir, tmp_path):
    import ml_dtypes

    from qwenjax.interp import activations as A
    from qwenjax.interp.experiment import sae_experiment_from_dict
    from qwenjax.interp.run import load_model, token_stream

    exp = sae_experiment_from_dict(yaml.safe_load(experiment(tmp_path, model_dir).read_text()))
    model, tok, key = load_model(exp)
    ref, _ = A.collect(model, key, token_stream(exp, tok), 2048)
    store = A.DiskStore(tmp_path / "store", "bfloat16")
    A.fill_store(store, model, key, token_stream(exp, tok), 1000, shard_rows=512)  # "killed"
    assert store.rows == 1024 and len(store.manifest["shards"]) == 2  # whole 256-row batches
    again = A.DiskStore(tmp_path / "store", "bfloat16")  # a new process resumes the capture
    A.fill_store(again, model, key, token_stream(exp, tok), 2048, shard_rows=512)
    rows = A.StoreRows(again)
    assert len(rows) == 2048 and len(again.manifest["shards"]) == 4
    got = rows[np.arange(2048)]
    want = ref.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="bfloat16 activations"):
        A.DiskStore(tmp_path / "store", "float32")
