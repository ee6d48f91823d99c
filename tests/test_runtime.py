"""RuntimeConfig: one home for how a model runs. The experiment's `runtime:` section reaches the
model; architecture files (presets, model_overrides, checkpoints) refuse runtime keys with a line
that names their new place; a parameter checkpoint is restored in the dtype it was stored in
unless the runtime asks otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwenjax
from qwenjax.config import ModelConfig
from qwenjax.experiment import load_experiment
from qwenjax.runtime import RuntimeConfig


def test_experiment_runtime_reaches_the_model():
    exp = load_experiment(None, ["runtime={dtype: bfloat16, remat: dots, attn_block: 64}",
                                 "runtime.moe_capacity_factor=1", "runtime.platform=tpu"])
    cfg = exp.model_config()
    assert cfg.runtime == RuntimeConfig(dtype="bfloat16", remat="dots", attn_block=64,
                                        moe_capacity_factor=1.0, platform="tpu")
    assert "runtime" not in cfg.to_dict() and "dtype" not in cfg.to_dict()
    # the runtime takes part in equality (a model's graph, so jit's cache, holds it)
    assert cfg != cfg.with_runtime(remat="full") and hash(cfg) != hash(cfg.with_runtime(remat="full"))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg.replace(runtime=RuntimeConfig())


def test_older_experiment_spellings_are_read_into_runtime(capsys):
    """Run directories written before the runtime section (top-level dtype / remat,
    mesh.platform) still load: the values land in runtime, with one note per key."""
    exp = load_experiment(None, ["dtype=bfloat16", "remat=none", "mesh.platform=tpu"])
    assert (exp.runtime.dtype, exp.runtime.remat, exp.runtime.platform) == ("bfloat16", "none", "tpu")
    err = capsys.readouterr().err
    assert "dtype is now runtime.dtype" in err and "mesh.platform is now runtime.platform" in err


@pytest.mark.parametrize("setting,where", [
    ("model_overrides.attn_block=64", "runtime.attn_block"),
    ("model_overrides.moe_capacity_factor=1.25", "runtime.moe_capacity_factor"),
    ("model_overrides.runtime={dtype: bfloat16}", "(runtime)"),
])
def test_runtime_keys_in_the_architecture_name_the_runtime_section(setting, where):
    with pytest.raises(qwenjax.ConfigError, match=where.replace(".", r"\.").replace("(", r"\(")
                       .replace(")", r"\)")) as e:
        load_experiment(None, [setting])
    assert "\n" not in str(e.value)


def test_a_run_may_resume_with_other_how_to_run_settings(tmp_path):
    """check_run_dir reads an older config.yaml (top-level dtype) as the same experiment; a
    different remat or platform may resume the run, a different dtype may not."""
    import yaml

    from qwenjax.experiment import dump_experiment
    from qwenjax.train.loop import check_run_dir

    exp = load_experiment(None, ["runtime.dtype=bfloat16"])
    old = yaml.safe_load(dump_experiment(exp))
    old["dtype"] = old.pop("runtime")["dtype"]  # as session-5 qwenjax wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    for ok in ([], ["runtime.remat=dots", "runtime.platform=tpu", "runtime.moe_impl=ragged"]):
        e = load_experiment(None, ["runtime.dtype=bfloat16", *ok])
        check_run_dir(e, tmp_path, e.model_config())
    with pytest.raises(qwenjax.ConfigError, match="holds a different experiment"):
        check_run_dir(load_experiment(None, []), tmp_path, exp.model_config())


@pytest.mark.parametrize("setting,message", [
    ("runtime.dtype=float8", "runtime.dtype 'float8' is not one of"),
    ("runtime.moe_impl=tokamax", "runtime.moe_impl 'tokamax'"),
    ("runtime.platform=tpuu", "runtime.platform 'tpuu'"),
    ("runtime.attn_block=0", "runtime.attn_block must be"),
    ("runtime.moe_capacity_factor=-1", "runtime.moe_capacity_factor must be >= 0"),
    ("runtime.dtpye=bfloat16", "unknown key runtime.dtpye; did you mean 'dtype'"),
])
def test_bad_runtime_values(setting, message):
    with pytest.raises(qwenjax.ConfigError, match=message):
        load_experiment(None, [setting])


def test_moe_impl_setting_picks_the_kernel():
    """`runtime.moe_impl` overrides the platform's choice: the traced program (jaxpr) of a tiny
    MoE on one CPU device holds a ragged dot, or megablox's Pallas kernel (interpret mode), only
    when asked for one; all give the same output."""
    cfg = qwenjax.load_preset("qwen3-moe-tiny").replace(num_layers=1)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16)))
    outs = {}
    for impl in ("blocked", "ragged", "megablox"):
        model = qwenjax.init_model(cfg.with_runtime(moe_impl=impl))
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, t, g=graphdef: nnx.merge(g, s)(t))
        jaxpr = str(jax.make_jaxpr(fn)(state, ids))
        assert ("ragged_dot" in jaxpr, "pallas_call" in jaxpr) == (impl == "ragged", impl == "megablox")
        outs[impl] = np.asarray(fn(state, ids))
    for impl in ("ragged", "megablox"):
        assert np.abs(outs["blocked"] - outs[impl]).max() <= 1e-5, impl


def test_params_restore_in_stored_dtype_unless_asked(tmp_path):
    from qwenjax.train.checkpoint import load_params, save_params

    cfg = qwenjax.load_preset("qwen3-tiny").replace(num_layers=1)
    model = qwenjax.init_model(cfg.with_runtime(param_dtype="bfloat16"))
    ckpt = save_params(model, tmp_path / "ckpt")
    dtypes = lambda m: {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))}
    assert dtypes(load_params(ckpt)) == {jnp.dtype("bfloat16")}
    back = load_params(ckpt, runtime=RuntimeConfig(dtype="bfloat16", param_dtype="float32"))
    assert dtypes(back) == {jnp.dtype("float32")} and back.config.runtime.dtype == "bfloat16"
    # `qwenjax generate --checkpoint` keeps the stored dtype whatever the compute dtype
    from qwenjax.infer.generate import load_for_inference

    gen, _ = load_for_inference(checkpoint_dir=ckpt, runtime=RuntimeConfig(dtype="float32"))
    assert dtypes(gen) == {jnp.dtype("bfloat16")} and gen.config.runtime.dtype == "float32"
