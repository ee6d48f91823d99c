"""ExperimentConfig: everything a run needs besides the architecture, loaded from YAML.

A file may name `base: other.yaml` (relative to itself) and override any key of it; command-line
`--set section.key=value` overrides come last (values parsed as YAML, then type-checked). Every
key is checked: an unknown one is an error naming the closest valid key. The resolved config is
written into the run directory as `config.yaml`, and `load_experiment` reads it back unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qwenjax.config import ModelConfig, load_preset
from qwenjax.errors import ConfigError
from qwenjax.ops.context_layout import check_divisible
from qwenjax.runtime import RuntimeConfig

# Keys that moved into `runtime:` (older experiment files and run dirs spell them so): read
# into runtime with a note naming the new key, so a run directory written before still resumes.
MOVED_TO_RUNTIME = {"dtype": "dtype", "param_dtype": "param_dtype", "remat": "remat",
                    "mesh.platform": "platform"}
# Runtime settings that change how a step runs but not what it computes: a run may resume
# with other values (e.g. started on CPU, resumed on TPU).
RESUMABLE_RUNTIME = ("remat", "attn_block", "moe_impl", "platform", "attention_impl",
                     "splash_block")


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    context: int = 1
    # Token layout over `context` (qwenjax/ops/context_layout.py): zigzag balances causal work.
    context_layout: str = "zigzag"
    rules: dict[str, Any] = field(default_factory=dict)  # logical axis -> mesh axes overrides

    def __post_init__(self):
        for axis, size in self.shape().items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ConfigError(f"mesh.{axis} must be an integer >= 1, got {size!r}")

    def shape(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in ("data", "fsdp", "expert", "tensor", "context")}

    @property
    def batch_ways(self) -> int:
        """How many ways the batch is split (the mesh axes the `batch` logical axis uses)."""
        return self.data * self.fsdp * self.expert


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    # stdlib (Python's own sources, offline everywhere) | text | jsonl | passkey (synthetic
    # passkey-retrieval documents, qwenjax.data.passkey; max_docs of them, 20000 if 0) | sft
    # (JSONL of chat `messages`, prompt/completion or text records, qwenjax.data.sft)
    source: str = "stdlib"
    paths: list[str] = field(default_factory=list)  # globs for text / jsonl
    text_field: str = "text"  # the JSONL field holding the text
    max_docs: int = 0  # 0 = all documents
    seq_len: int = 256
    overlong: str = "truncate"  # sft: an example longer than seq_len is cut (truncate) or dropped
    loss_on: str = "assistant"  # sft: assistant turns / completions only, or all (ablation)

    def __post_init__(self):
        if self.source not in ("stdlib", "text", "jsonl", "passkey", "sft"):
            raise ConfigError(
                f"data.source {self.source!r} is not one of stdlib, text, jsonl, passkey, sft"
            )
        if self.overlong not in ("truncate", "drop"):
            raise ConfigError(f"data.overlong {self.overlong!r} is not one of truncate, drop")
        if self.loss_on not in ("assistant", "all"):
            raise ConfigError(f"data.loss_on {self.loss_on!r} is not one of assistant, all")
        if self.source in ("text", "jsonl", "sft") and not self.paths:
            raise ConfigError(f"data.paths is required for data.source={self.source}")
        if self.seq_len < 2:
            raise ConfigError("data.seq_len must be >= 2")
        if self.max_docs < 0:
            raise ConfigError(f"data.max_docs must be >= 0 (0 = all), got {self.max_docs}")


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    # bpe: train a byte-level BPE on the data | hf: a tokenizer.json path | sentencepiece: a
    # SentencePiece .model path (converted to a tokenizer.json pipeline, qwenjax/data/spm.py)
    kind: str = "bpe"
    vocab_size: int = 512  # for bpe
    path: str = ""  # for hf and sentencepiece
    train_docs: int = 2000  # documents the BPE is trained on

    def __post_init__(self):
        if self.kind not in ("bpe", "hf", "sentencepiece"):
            raise ConfigError(f"tokenizer.kind {self.kind!r} is not one of bpe, hf, sentencepiece")
        if self.kind != "bpe" and not self.path:
            raise ConfigError(f"tokenizer.path is required for tokenizer.kind={self.kind}")
        if self.train_docs < 1:
            raise ConfigError(f"tokenizer.train_docs must be >= 1, got {self.train_docs}")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | linear | constant, each after a linear warmup
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # final lr / lr for cosine and linear
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_all: bool = False  # False: spare norms, biases and embeddings from weight decay
    clip_norm: float = 1.0  # global-norm clipping; 0 = off

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optimizer.schedule {self.schedule!r} is not one of cosine, linear, constant")
        if self.lr <= 0:
            raise ConfigError("optimizer.lr must be > 0")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = 100  # steps between saves (and one at the end)
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        # keep=0 would let no checkpoint survive; every=0 has no schedule.
        if self.every < 1 or self.keep < 1:
            raise ConfigError(
                f"checkpoint.every and checkpoint.keep must be >= 1, got {self.every} and {self.keep}"
            )


# LoRA target names: short names for the projections, or Hugging Face module names (which is
# what PEFT's target_modules match). "experts": every routed expert's gate/up/down (per expert).
LORA_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj"}
LORA_HF_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz",
                   "in_proj_ba", "out_proj", "experts")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Low-rank adapters (qwenjax/train/lora.py): rank 0 = off (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0  # the update is (alpha / rank) * A @ B, as PEFT's lora_alpha
    dropout: float = 0.0  # PEFT's lora_dropout on the adapter input (training only)
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    init: str = ""  # a PEFT adapter directory to start from (its rank/alpha/targets must match)

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0 = off), got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and "experts" in self.targets:
            raise ConfigError(
                f"lora.dropout {self.dropout} with expert adapters: routed experts take no "
                "dropout (nor does PEFT for fused expert parameters); set lora.dropout: 0.0 or "
                "drop 'experts' from lora.targets")
        bad = [t for t in self.targets if t not in LORA_TARGETS and t not in LORA_HF_MODULES]
        if bad or (self.rank and not self.targets):
            raise ConfigError(f"lora.targets {self.targets!r}: each must be one of "
                              f"{[*LORA_TARGETS, *LORA_HF_MODULES]}")

    def hf_modules(self) -> set[str]:
        return {LORA_TARGETS.get(t, t) for t in self.targets}


@dataclass(frozen=True, kw_only=True)
class MTPConfig:
    """Multi-token prediction in training (model/mtp.py): the loss adds `weight` times the mean
    over depths 1..`depth` of each depth's cross-entropy. The model needs MTP layers
    (`mtp_layers` in its config; Qwen3-Next / Qwen3.5 checkpoints ship one)."""

    depth: int = 0  # 0 = off
    weight: float = 0.3  # DeepSeek-V3's lambda for the first 10T tokens

    def __post_init__(self):
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ConfigError(f"mtp.depth must be an integer >= 0 (0 = off), got {self.depth!r}")
        if self.weight < 0:
            raise ConfigError(f"mtp.weight must be >= 0, got {self.weight}")


EVAL_TASKS = ("passkey", "niah_single", "niah_multikey", "variable_tracking", "common_words",
              "perplexity")  # qwenjax.evals runs them; see qwenjax/evals/__init__.py


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """`qwenjax eval`: which long-context tasks, at which prompt lengths (tokens) and depths."""

    model: str = ""  # HF dir, parameter checkpoint or run dir; "" = init_from, else the run dir
    output_dir: str = ""  # "" = <run dir>/eval
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    lengths: list[int] = field(default_factory=lambda: [4096, 8192])  # whole prompt, in tokens
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 4  # prompts per (task, length, depth) cell
    filler: str = "essay"  # essay: Python's documentation prose | repeat: "The grass is green."
    batch_size: int = 4  # prompts per generate / forward call
    seed: int = 0
    num_keys: int = 4  # niah_multikey: needles in the haystack, one asked for
    ppl_buckets: int = 8  # perplexity: equal position ranges per length

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in EVAL_TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"eval.tasks {self.tasks!r}: each must be one of {EVAL_TASKS}")
        if not self.lengths or any(not isinstance(n, int) or n < 16 for n in self.lengths):
            raise ConfigError(f"eval.lengths {self.lengths!r}: need integers >= 16 (tokens)")
        if not self.depths or any(not isinstance(d, (int, float)) or not 0 <= d <= 1
                                  for d in self.depths):
            raise ConfigError(f"eval.depths {self.depths!r}: need fractions in [0, 1]")
        if self.filler not in ("essay", "repeat"):
            raise ConfigError(f"eval.filler {self.filler!r} is not one of essay, repeat")
        if min(self.samples, self.batch_size, self.ppl_buckets) < 1 or self.num_keys < 2:
            raise ConfigError("eval.samples, batch_size, ppl_buckets must be >= 1, num_keys >= 2")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    model: Any = "qwen3-moe-tiny"  # a preset name, a YAML path, or an inline mapping
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {num_layers: 2}
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    steps: int = 300
    batch_size: int = 16  # global batch (rows) per optimizer step
    grad_accum: int = 1  # micro-batches per step: each is batch_size / grad_accum rows
    seed: int = 0
    # How the model runs (dtypes, remat, attention block, MoE kernel and capacity, platform):
    # qwenjax/runtime.py. Set once here; every program of the run reads it.
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    aux_loss_weight: float = 0.001  # router load-balancing loss
    z_loss_weight: float = 0.0  # router z-loss
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    log_every: int = 10
    init_from: str = ""  # a parameter checkpoint from `qwenjax import-hf`
    export_hf: bool = True  # write run_dir/hf (HF weights + tokenizer) at the end
    sample_tokens: int = 48  # greedy sample printed at the end; 0 = none

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("steps, batch_size and grad_accum must be >= 1")
        if self.log_every < 1 or self.max_bad_steps < 1:
            raise ConfigError(
                f"log_every and max_bad_steps must be >= 1, got {self.log_every} and "
                f"{self.max_bad_steps}"
            )
        if self.sample_tokens < 0:
            raise ConfigError(
                f"sample_tokens must be >= 0 (0 = no sample), got {self.sample_tokens}"
            )
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        if self.mtp.depth and self.data.source == "sft":
            raise ConfigError("mtp.depth > 0 is not supported with data.source=sft (SFT rows "
                              "carry no look-ahead tokens); set mtp.depth=0")
        micro = self.batch_size // self.grad_accum
        if micro % self.mesh.batch_ways:
            raise ConfigError(
                f"micro-batch {micro} (batch_size / grad_accum) is not divisible by the batch "
                f"axes data*fsdp*expert = {self.mesh.batch_ways}"
            )
        try:
            check_divisible(self.data.seq_len, self.mesh.context, self.mesh.context_layout)
        except ValueError as e:
            raise ConfigError(f"data.seq_len: {e}") from None

    def model_config(self) -> ModelConfig:
        if isinstance(self.model, dict):
            cfg = ModelConfig.from_dict(self.model, source="experiment model")
        elif isinstance(self.model, str):
            cfg = load_preset(self.model)
        else:
            raise ConfigError("model must be a preset name, a YAML path or a mapping")
        if self.model_overrides:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), **self.model_overrides},
                                        source="model_overrides")
        cfg = cfg.replace(runtime=self.runtime)
        if self.mtp.depth and not cfg.mtp_layers:
            raise ConfigError(
                f"mtp.depth is {self.mtp.depth} but the model has no MTP layers; set "
                "model_overrides.mtp_layers (Qwen3-Next / Qwen3.5 checkpoints have 1)"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- loading ----------------------------------------------------------------------------------


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: base files form a cycle")
    if not path.exists():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base:
        data = _merge(_read_yaml(path.parent / base, seen + (path,)), data)
    return data


def _apply_override(data: dict, text: str) -> dict:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node: dict[str, Any] = {}
    cursor = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cursor[p] = cursor = {}
    cursor[parts[-1]] = value
    return _merge(data, node)


def _hint(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def _build(cls: type, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown key {where + '.' if where else ''}{key}{_hint(key, list(fields))}")
        want = hints[key]
        name = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(want):
            kwargs[key] = _build(want, value, name)
        else:
            kwargs[key] = _check_type(value, want, name)
    return cls(**kwargs)


def _check_type(value: Any, want: Any, name: str) -> Any:
    origin = typing.get_origin(want)
    if want is Any:
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return value
    if isinstance(want, type):
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{name} must be {want.__name__}, got {value!r}")
    return value


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML (with `base:` files), apply `--set` overrides, validate."""
    data = _read_yaml(Path(path)) if path else {}
    for text in overrides:
        data = _apply_override(data, text)
    return experiment_from_dict(data)


def experiment_from_dict(data: dict, *, quiet: bool = False) -> ExperimentConfig:
    """Validate a resolved experiment mapping (older spellings moved into `runtime:`)."""
    exp = _build(ExperimentConfig, _move_legacy_keys(data, quiet), "")
    exp.model_config()  # resolve now, so a bad model section fails before anything runs
    return exp


def _move_legacy_keys(data: dict, quiet: bool) -> dict:
    data = dict(data)
    runtime = dict(data.get("runtime") or {}) if isinstance(data.get("runtime"), dict) else None
    mesh = dict(data["mesh"]) if isinstance(data.get("mesh"), dict) else None
    for old, new in MOVED_TO_RUNTIME.items():
        holder, key = (mesh, "platform") if old == "mesh.platform" else (data, old)
        if holder is None or key not in holder or runtime is None and "runtime" in data:
            continue
        runtime = runtime if runtime is not None else {}
        runtime.setdefault(new, holder.pop(key))
        if not quiet:
            print(f"qwenjax: note: {old} is now runtime.{new}; read as such", file=sys.stderr)
    if runtime is not None:
        data["runtime"] = runtime
    if mesh is not None:
        data["mesh"] = mesh
    return data


def same_run(a: ExperimentConfig, b: ExperimentConfig) -> bool:
    """Whether b may continue a's run: equal but for the runtime settings that do not change
    what a step computes (RESUMABLE_RUNTIME)."""
    keep = lambda e: dataclasses.replace(
        e, runtime=e.runtime.replace(**{k: getattr(RuntimeConfig(), k) for k in RESUMABLE_RUNTIME}))
    return keep(a) == keep(b)


def dump_experiment(exp: ExperimentConfig) -> str:
    return yaml.safe_dump(exp.to_dict(), sort_keys=False)
