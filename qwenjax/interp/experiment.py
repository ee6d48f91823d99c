"""SAEExperiment: what `qwenjax sae train EXPERIMENT.yaml` runs, loaded strictly from YAML (same
rules as training experiments: `base:` files, `--set` overrides, unknown keys named).

    model: {hf: runs/main/hf}            # or {checkpoint: CKPT_DIR}; tokenizer.json beside it
    site: blocks.2.resid_post
    data: {source: stdlib, seq_len: 64, max_docs: 400}
    sae: {architecture: topk, expansion: 8, k: 16}
    train_tokens: 200000                 # activations captured for training
    steps: 1500
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qwenjax.errors import ConfigError
from qwenjax.experiment import CheckpointConfig, DataConfig, _apply_override, _build, _read_yaml
from qwenjax.interp.capture import parse_site
from qwenjax.interp.sae import SAEConfig


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    hf: str = ""  # a Hugging Face directory (e.g. a run's hf/ export)
    checkpoint: str = ""  # or a qwenjax parameter checkpoint (import-hf output)
    dtype: str = "float32"  # compute dtype of the forward that produces activations

    def __post_init__(self):
        if bool(self.hf) == bool(self.checkpoint):
            raise ConfigError("model: give exactly one of model.hf and model.checkpoint")

    @property
    def path(self) -> str:
        return self.hf or self.checkpoint


@dataclass(frozen=True, kw_only=True)
class SAEExperiment:
    model: ModelSource
    site: str  # blocks.LAYER.NAME, NAME one of qwenjax.model.hooks.SITES
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train_tokens: int = 200_000  # activation rows for training (the model's own tokens)
    eval_tokens: int = 8192  # held-out rows (read before the training ones) for evaluation
    model_batch: int = 8  # sequences per capture forward
    store: str = "memory"  # memory | disk: run_dir/activations, resumable .npy shards
    store_dtype: str = "float32"  # float32 | bfloat16 (disk store)
    batch_size: int = 1024  # activation rows per SAE step
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 50
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # steps between evaluations (spliced-in loss too); 0 = only at the end
    latent_devices: int = 1  # devices the latents are split over (wide SAEs)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=500))
    # analysis (`qwenjax sae analyze`)
    analyze_latents: int = 32  # dashboard pages for this many latents (most frequent first)
    top_contexts: int = 12
    context_window: int = 12  # tokens either side of an activating token

    def __post_init__(self):
        parse_site(self.site)
        if self.store not in ("memory", "disk"):
            raise ConfigError(f"store {self.store!r} is not one of memory, disk")
        if self.store_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"store_dtype {self.store_dtype!r} is not one of float32, bfloat16")
        for name in ("train_tokens", "eval_tokens", "model_batch", "batch_size", "steps",
                     "log_every", "latent_devices", "analyze_latents", "top_contexts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > self.train_tokens:
            raise ConfigError(f"batch_size {self.batch_size} is more than train_tokens "
                              f"{self.train_tokens}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.eval_every < 0:
            raise ConfigError("lr must be > 0, warmup_steps and eval_every >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_sae_experiment(path: str | Path, overrides: list[str] = ()) -> SAEExperiment:
    data = _read_yaml(Path(path))
    for text in overrides:
        data = _apply_override(data, text)
    return sae_experiment_from_dict(data)


def sae_experiment_from_dict(data: dict) -> SAEExperiment:
    for key in ("model", "site"):
        if key not in data:
            raise ConfigError(f"SAE experiment: the key {key!r} is required")
    return _build(SAEExperiment, data, "")


def dump(exp: SAEExperiment) -> str:
    return yaml.safe_dump(exp.to_dict(), sort_keys=False)
