"""A LoRA run's model: built for training, exported at the end (PEFT adapter + merged weights),
and rebuilt from its run directory for `qwenjax export-hf RUN --adapter | --merge`.

The run's checkpoints hold only the adapters and their optimizer state; the frozen base is
rebuilt the way the run built it (from `init_from`, or from the seed), so a LoRA run directory
costs adapter-sized checkpoints.
"""

from __future__ import annotations

import jax
import yaml
from flax import nnx

from qwenjax.errors import ConfigError
from qwenjax.experiment import ExperimentConfig, experiment_from_dict
from qwenjax.model.partition import init_sharded
from qwenjax.paths import as_path
from qwenjax.train.lora import add_adapters, merge_adapters, split_trainable


def lora_model(model, exp: ExperimentConfig, mesh=None, rules=None):
    """(graphdef, adapters, (base,)): `model` with `exp.lora` adapters, split for training."""
    if exp.lora.init:
        from qwenjax.hf.peft import load_peft_adapter

        read = load_peft_adapter(model, exp.lora.init, exp.seed)
        if (read.rank, read.alpha, read.hf_modules()) != (
                exp.lora.rank, exp.lora.alpha, exp.lora.hf_modules()):
            raise ConfigError(
                f"lora.init {exp.lora.init}: its rank {read.rank}, alpha {read.alpha}, targets "
                f"{sorted(read.hf_modules())} differ from the experiment's lora section")
    else:
        add_adapters(model, exp.lora, exp.seed)
    graphdef, adapters, base = split_trainable(model, mesh, rules)
    return graphdef, adapters, (base,)


def export_lora_run(model, exp: ExperimentConfig, run_dir, tokenizer, overwrite: bool) -> dict:
    """At the end of a LoRA run: run_dir/adapter (PEFT) and, with export_hf, run_dir/hf with the
    adapters merged into the weights."""
    from qwenjax.hf.convert import save_pretrained
    from qwenjax.hf.peft import save_peft_adapter

    out = {"adapter_dir": str(save_peft_adapter(model, as_path(run_dir) / "adapter", exp.lora,
                                                base_model=exp.init_from, overwrite=True))}
    if exp.export_hf:
        merged = nnx.merge(*nnx.split(model))  # a copy: the caller keeps the adapters
        merge_adapters(merged)
        ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
        out["hf_dir"] = str(save_pretrained(merged, as_path(run_dir) / "hf",
                                            dtype=exp.runtime.param_dtype, generation=ids,
                                            tokenizer=tokenizer, overwrite=overwrite))
    return out


def load_run_model(run_dir):
    """(model with its adapters at the newest checkpoint, experiment) of a LoRA run."""
    from qwenjax.train.checkpoint import RunCheckpointer, load_params
    from qwenjax.train.optimizer import make_optimizer
    from qwenjax.train.step import init_train_state

    run_dir = as_path(run_dir)
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{run_dir}: not a training run directory (no config.yaml)")
    exp = experiment_from_dict(yaml.safe_load(path.read_text()) or {}, quiet=True)
    if not exp.lora.rank:
        raise ConfigError(f"{run_dir}: not a LoRA run (lora.rank is 0); export its hf/ instead")
    if exp.init_from:
        model = load_params(exp.init_from, runtime=exp.runtime)
    else:
        model = nnx.merge(*init_sharded(exp.model_config(), None, None, exp.seed))
    graphdef, adapters, frozen = lora_model(model, exp)
    tx = make_optimizer(exp.optimizer, exp.steps, adapters)
    state = init_train_state(adapters, tx)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    ckpt = RunCheckpointer(run_dir / "checkpoints", keep=exp.checkpoint.keep, async_save=False)
    try:
        restored = ckpt.restore_latest(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"{run_dir}: the run has no checkpoint yet")
    return nnx.merge(graphdef, restored[1].params, *frozen), exp
