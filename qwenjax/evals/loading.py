"""Finding the model and tokenizer an eval experiment names, and applying its context settings.

`eval.model` (else `init_from`, else the experiment's run directory) may be:
- a Hugging Face directory (config.json + safetensors; tokenizer.json beside it or in
  `tokenizer.path`),
- a qwenjax parameter checkpoint (`qwenjax import-hf` output: model_config.json + params/),
- a training run directory (its `hf/` export and tokenizer).

Context-extension settings come from `model_overrides`, restricted to the keys that change no
parameter shape (`rope`, `max_position_embeddings`): e.g. YaRN factor 4 over an original 32K on
an imported Qwen2.5 checkpoint. A partial `rope` mapping is merged into the checkpoint's own
(keeping its theta and partial rotary factor). The weights are kept; only the static config in
the graph definition changes.
"""

from __future__ import annotations

import math
from pathlib import Path

from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.data.tokenizer import Tokenizer, load_tokenizer
from qwenjax.errors import ConfigError
from qwenjax.experiment import ExperimentConfig
from qwenjax.model.partition import abstract_model
from qwenjax.model.transformer import CausalLM
from qwenjax.paths import as_path
from qwenjax.sharding import check_rules, make_mesh

CONTEXT_KEYS = ("rope", "max_position_embeddings")


def model_source(exp: ExperimentConfig, run_dir: str | Path) -> Path:
    return as_path(exp.eval.model or exp.init_from or run_dir)


def load(exp: ExperimentConfig, run_dir: str | Path) -> tuple[CausalLM, Tokenizer, Path]:
    """(model with the experiment's context settings, tokenizer, where they came from); with a
    mesh in the experiment the model is sharded on `eval_mesh(exp)`."""
    from qwenjax.hf.convert import from_pretrained
    from qwenjax.train.checkpoint import load_params

    src = model_source(exp, run_dir)
    mesh, rules = eval_mesh(exp), check_rules(exp.mesh.rules)
    tok_dirs = [as_path(exp.tokenizer.path)] if exp.tokenizer.kind == "hf" else []
    if (src / "hf" / "config.json").exists():  # a training run
        src = src / "hf"
        tok_dirs += [src, src.parent / "tokenizer"]
    if (src / "config.json").exists():
        model = from_pretrained(src, runtime=exp.runtime, mesh=mesh, rules=rules)
        tok_dirs.append(src)
    elif (src / "model_config.json").exists():
        model = load_params(src, mesh=mesh, rules=rules, runtime=exp.runtime)
    else:
        raise ConfigError(
            f"eval model {src}: not a Hugging Face directory, parameter checkpoint or run "
            "directory with an hf/ export (train it first, or set eval.model / init_from)"
        )
    found = [d for d in tok_dirs if (d / "tokenizer.json").exists() or d.is_file()]
    if not found:
        raise ConfigError(f"eval model {src}: no tokenizer.json; set tokenizer.kind=hf and path")
    return with_context_settings(model, exp.model_overrides), load_tokenizer(found[0]), src


def eval_mesh(exp: ExperimentConfig):
    """The experiment's mesh, or None for one device (a mesh of 1 would not cover simulated
    multi-device hosts)."""
    return make_mesh(exp.mesh.shape()) if math.prod(exp.mesh.shape().values()) > 1 else None


def with_context_settings(model: CausalLM, overrides: dict) -> CausalLM:
    """The same weights under a config with `overrides`' rope / max_position_embeddings."""
    keep = {k: v for k, v in overrides.items() if k in CONTEXT_KEYS}
    if not keep:
        return model
    d = model.config.to_dict()
    if isinstance(keep.get("rope"), dict) and isinstance(d.get("rope"), dict):
        keep["rope"] = {**d["rope"], **keep["rope"]}
    cfg = ModelConfig.from_dict({**d, **keep}, source="model_overrides")
    cfg = cfg.replace(runtime=model.config.runtime)
    graphdef, _ = abstract_model(cfg)
    return nnx.merge(graphdef, nnx.state(model))
