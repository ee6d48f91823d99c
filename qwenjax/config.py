"""ModelConfig: the architecture of one model, and its translation from/to HF `config.json`.

Layers read features (`qk_norm`, `qkv_bias`, `mlp_types[i]` ...), never family names; the
family-specific knowledge of how a Hugging Face config spells those features lives here, in
`_FAMILIES` and `from_hf_config`, and nowhere else in the model code.

Keys of an HF config that the architecture does not use (token ids, `initializer_range`, the
stored dtype ...) are carried in `hf_extra` so that `to_hf_config(from_hf_config(d))` gives back
what `transformers` wrote.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qwenjax.errors import ConfigError
from qwenjax.runtime import RUNTIME_KEYS, RuntimeConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
ATTENTION_TYPES = ("full_attention", "linear_attention")


@dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding; field names follow HF `rope_parameters`."""

    rope_theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0  # linear / dynamic / yarn scaling factor
    original_max_position_embeddings: int | None = None  # yarn: the pre-extension length
    attention_factor: float | None = None  # yarn: cos/sin scale; None = derived from factor
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0  # rotate only the first fraction of each head's dims
    # Qwen3.5 multimodal RoPE sections. With text-only input all three position streams are equal
    # and M-RoPE is plain 1-D RoPE over the rotary dims; kept so exports reproduce the config.
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False

    def __post_init__(self):
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type {self.rope_type!r} is not supported; use one of {ROPE_TYPES}")
        if self.rope_type != "default" and self.factor <= 0:
            raise ConfigError(f"rope factor must be > 0, got {self.factor}")
        if self.rope_type == "yarn" and not self.original_max_position_embeddings:
            raise ConfigError("yarn rope needs original_max_position_embeddings")

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        if self.mrope_section:
            out["mrope_section"] = list(self.mrope_section)
            out["mrope_interleaved"] = self.mrope_interleaved
        if self.rope_type == "default":
            return out
        out["factor"] = self.factor
        if self.rope_type == "yarn":
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, k) is not None:
                    out[k] = getattr(self, k)
            if self.beta_fast != 32.0:
                out["beta_fast"] = self.beta_fast
            if self.beta_slow != 1.0:
                out["beta_slow"] = self.beta_slow
            if not self.truncate:
                out["truncate"] = False
        return out


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One decoder-only Qwen architecture. D = hidden_size, F = intermediate sizes, E = experts."""

    model_type: str  # the HF family: picks the name table for import/export, nothing else
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense SwiGLU width (dense layers; 0 if every layer is MoE)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (qwen3)
    max_position_embeddings: int = 32768
    rope: RopeConfig = field(default_factory=RopeConfig)
    # Mixture of experts; num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1  # layer i is MoE iff (i+1) % step == 0 and i not in mlp_only_layers
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # Hybrid (Qwen3-Next / Qwen3.5): per-layer attention kind, Gated DeltaNet sizes, gated attention.
    layer_types: tuple[str, ...] = ()  # "full_attention" | "linear_attention"; () = all full
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    attention_output_gate: bool = False  # q_proj also yields a per-head sigmoid gate on the output
    norm_zero_centered: bool = False  # RMSNorm scales by (1 + w), computed in fp32
    # Multi-token prediction (Qwen3-Next / Qwen3.5 `mtp_num_hidden_layers`): decoder layers of
    # the MTP module (model/mtp.py); 0 = none.
    mtp_layers: int = 0
    # JSON of HF config keys we carry but do not use (token ids, stored dtype, ...).
    hf_extra: str = "{}"
    # How it runs (dtypes, remat, kernels: qwenjax/runtime.py), not what it is: never saved or
    # exported. It takes part in == and hash, since a model's graph (and so jit's cache) holds it.
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                    f"({self.num_experts})"
                )
            if self.moe_intermediate_size <= 0:
                raise ConfigError("moe_intermediate_size must be > 0 for a MoE model")
            if self.decoder_sparse_step < 1:
                raise ConfigError("decoder_sparse_step must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"mlp_only_layers {bad} are outside 0..{self.num_layers - 1}")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
                )
            bad_types = sorted(set(self.layer_types) - set(ATTENTION_TYPES))
            if bad_types:
                raise ConfigError(f"layer_types {bad_types} are not among {ATTENTION_TYPES}")
        if "linear_attention" in self.attention_types:
            sizes = (self.linear_num_key_heads, self.linear_num_value_heads,
                     self.linear_key_head_dim, self.linear_value_head_dim)
            if min(sizes) <= 0:
                raise ConfigError("linear attention layers need linear_* head counts and dims > 0")
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ConfigError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.mtp_layers < 0:
            raise ConfigError(f"mtp_layers must be >= 0, got {self.mtp_layers}")
        if "dense" in self.mlp_types and self.intermediate_size <= 0:
            raise ConfigError("intermediate_size must be > 0 when some layer has a dense MLP")

    # ---- derived ----
    @property
    def num_groups(self) -> int:
        """Query heads per kv head (G)."""
        return self.num_heads // self.num_kv_heads

    @property
    def mlp_types(self) -> tuple[str, ...]:
        """Per layer: "moe" or "dense", with the exact rule of `transformers`."""
        return tuple(
            "moe"
            if self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
            else "dense"
            for i in range(self.num_layers)
        )

    @property
    def attention_types(self) -> tuple[str, ...]:
        return self.layer_types or ("full_attention",) * self.num_layers

    @property
    def layer_kinds(self) -> tuple[tuple[str, str], ...]:
        """Per layer: (attention type, mlp type). Layers of one kind share a parameter structure."""
        return tuple(zip(self.attention_types, self.mlp_types))

    @property
    def mtp_kind(self) -> tuple[str, str]:
        """The MTP module's decoder layers: full attention, with the family's MLP (MoE when the
        model has experts, as vLLM's Qwen3-Next / Qwen3.5 MTP builds them)."""
        return ("full_attention", "moe" if self.num_experts > 0 else "dense")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def extra(self) -> dict[str, Any]:
        return json.loads(self.hf_extra)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_runtime(self, runtime: RuntimeConfig | None = None, **changes: Any) -> ModelConfig:
        """This architecture run with `runtime` (default: the current one), changed by `changes`,
        e.g. `cfg.with_runtime(dtype="bfloat16")`."""
        return self.replace(runtime=(runtime or self.runtime).replace(**changes))

    # ---- dict / YAML ----
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "model config") -> ModelConfig:
        d = dict(d)
        rope = d.pop("rope", None)
        moved = sorted(set(d) & (RUNTIME_KEYS | {"runtime"}))
        if moved:
            where = "runtime" if moved == ["runtime"] else f"runtime.{moved[0]}"
            raise ConfigError(
                f"{source}: {', '.join(moved)}: how the model runs is no part of the architecture; "
                f"set it in the experiment's runtime: section ({where})"
            )
        _check_keys(d, cls, source, skip={"rope"})
        if rope is not None:
            if not isinstance(rope, dict):
                raise ConfigError(f"{source}: 'rope' must be a mapping")
            _check_keys(rope, RopeConfig, f"{source}: rope")
            if "mrope_section" in rope:
                rope = dict(rope, mrope_section=tuple(rope["mrope_section"]))
            d["rope"] = RopeConfig(**rope)
        for key in ("mlp_only_layers", "layer_types"):
            if key in d:
                d[key] = tuple(d[key])
        if isinstance(d.get("hf_extra"), dict):
            d["hf_extra"] = json.dumps(d["hf_extra"], sort_keys=True)
        _check_types(d, cls, source)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The architecture (what presets and checkpoints hold); the runtime is left out."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "runtime"}
        out["rope"] = dataclasses.asdict(self.rope)
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        out["layer_types"] = list(self.layer_types)
        return out

    # ---- Hugging Face ----
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        return _from_hf(hf)

    def to_hf_config(self) -> dict[str, Any]:
        return _to_hf(self)


def load_preset(name_or_path: str) -> ModelConfig:
    """A preset by name (`configs/models/NAME.yaml`) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        near = difflib.get_close_matches(str(name_or_path), known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; known presets: {', '.join(known)}"
        raise ConfigError(f"model preset {name_or_path!r} not found{hint}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return ModelConfig.from_dict(data, source=str(path))


def _check_keys(d: dict, cls: type, source: str, skip: set[str] = frozenset()) -> None:
    valid = {f.name for f in dataclasses.fields(cls)} | set(skip)
    for key in d:
        if key not in valid:
            near = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")


def _check_types(d: dict, cls: type, source: str) -> None:
    kinds = {"int": int, "float": (int, float), "bool": bool, "str": str}
    for f in dataclasses.fields(cls):
        if f.name not in d or not isinstance(f.type, str):
            continue
        want = kinds.get(f.type)
        value = d[f.name]
        if want is None:
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{source}: {f.name} must be {f.type}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig. One table row per family: which HF keys spell which
# features. Everything else is shared.

_FAMILIES: dict[str, dict[str, Any]] = {
    # qkv_bias: fixed value or the HF key that holds it; o_bias likewise. moe: False, or the key
    # that family's config.json uses for the expert count (both spellings are read).
    "qwen2": {"qkv_bias": True, "o_bias": False, "qk_norm": False, "moe": False},
    "qwen2_moe": {"qkv_bias": "qkv_bias", "o_bias": False, "qk_norm": False, "moe": "num_experts"},
    "qwen3": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "qk_norm": True, "moe": False},
    "qwen3_moe": {
        "qkv_bias": "attention_bias", "o_bias": "attention_bias", "qk_norm": True,
        "moe": "num_local_experts",  # the key transformers 5 writes for this family
    },
    # Hybrids: Gated DeltaNet + gated full attention, zero-centred norms, partial rotary.
    "qwen3_next": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "qk_norm": True,
                   "moe": "num_experts", "hybrid": True},
    "qwen3_5_text": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "qk_norm": True,
                     "moe": False, "hybrid": True},
    "qwen3_5_moe_text": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "qk_norm": True,
                         "moe": "num_experts", "hybrid": True,
                         "sparse_step": False,  # no decoder_sparse_step: every layer is MoE
                         "norm_topk_prob": True},  # its router always renormalises the top k
}
_LINEAR_KEYS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                "linear_value_head_dim", "linear_conv_kernel_dim")
_BIAS_DEFAULT = {"qkv_bias": True, "attention_bias": False}
# Numeric HF keys we read; a wrong type there would otherwise fail deep inside arithmetic.
_HF_INTS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "max_position_embeddings", "num_experts", "num_local_experts",
    "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "decoder_sparse_step", "full_attention_interval", "mtp_num_hidden_layers", *_LINEAR_KEYS,
)
_HF_FLOATS = ("rms_norm_eps", "rope_theta", "router_aux_loss_coef")

# HF keys fully described by ModelConfig fields (or recomputed on export); not carried in hf_extra.
_CONSUMED = {
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps", "tie_word_embeddings",
    "qkv_bias", "attention_bias", "max_position_embeddings", "rope_parameters", "rope_theta",
    "rope_scaling", "num_experts", "num_local_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "architectures",
    "transformers_version", "layer_types", "hidden_act", "use_sliding_window", "sliding_window",
    "max_window_layers", "full_attention_interval", "mtp_num_hidden_layers", *_LINEAR_KEYS,
}


def _check_hf_numbers(hf: dict[str, Any]) -> None:
    for key in _HF_INTS + _HF_FLOATS:
        value = hf.get(key)
        want = int if key in _HF_INTS else (int, float)
        if value is not None and (not isinstance(value, want) or isinstance(value, bool)):
            kind = "an integer" if key in _HF_INTS else "a number"
            raise ConfigError(f"config.json: {key} must be {kind}, got {value!r}")


def _hf_rope(hf: dict[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise ConfigError(f"config.json: rope_theta must be a number, got {theta!r}")
    rope_type = params.pop("rope_type", "default")
    known = {f.name for f in dataclasses.fields(RopeConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"config.json: rope_parameters keys {unknown} are not supported")
    params = {k: v for k, v in params.items() if v is not None}
    if "mrope_section" in params:
        params["mrope_section"] = tuple(params["mrope_section"])
    return RopeConfig(rope_theta=float(theta), rope_type=rope_type, **params)


# Multimodal wrappers whose `text_config` is one of our families. Their checkpoints keep the
# language model under `model.language_model.` beside `model.visual.*`; we load the text model
# and carry the wrapper (minus text_config) in hf_extra under WRAPPER_KEY for the export.
WRAPPERS = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
WRAPPER_KEY = "__wrapper__"
FUSED_EXPERTS_KEY = "__fused_experts__"  # the source stored experts fused: export them so too


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type in WRAPPERS:
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"config.json: {model_type} needs a text_config mapping")
        text = dict(text, model_type=text.get("model_type", WRAPPERS[model_type]))
        inner = _from_hf(text)
        wrapper = {k: v for k, v in hf.items() if k not in ("text_config", "transformers_version")}
        return inner.replace(hf_extra=json.dumps({**inner.extra, WRAPPER_KEY: wrapper}, sort_keys=True))
    if model_type not in _FAMILIES:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported; use one of {sorted(_FAMILIES)}"
        )
    fam = _FAMILIES[model_type]
    if hf.get("use_sliding_window"):
        raise ConfigError("config.json: use_sliding_window=true is not implemented in qwenjax yet")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
               if k not in hf]
    if missing:
        raise ConfigError(f"config.json: missing keys {missing}")
    _check_hf_numbers(hf)

    def feature(name: str) -> bool:
        spec = fam[name]
        return bool(hf.get(spec, _BIAS_DEFAULT.get(spec))) if isinstance(spec, str) else spec

    heads = hf["num_attention_heads"]
    num_experts = hf.get("num_experts", hf.get("num_local_experts", 0)) if fam["moe"] else 0
    extra = {k: v for k, v in hf.items() if k not in _CONSUMED}
    hybrid = _hybrid_fields(hf, hf["num_hidden_layers"]) if fam.get("hybrid") else {}
    return ModelConfig(
        **hybrid,
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf.get("intermediate_size", 0),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=feature("qkv_bias"),
        o_bias=feature("o_bias"),
        qk_norm=fam["qk_norm"],
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        rope=_hf_rope(hf),
        num_experts=num_experts or 0,
        num_experts_per_tok=hf.get("num_experts_per_tok", 0) if num_experts else 0,
        moe_intermediate_size=hf.get("moe_intermediate_size", 0) if num_experts else 0,
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0) or 0,
        norm_topk_prob=bool(fam.get("norm_topk_prob", hf.get("norm_topk_prob", False))),
        decoder_sparse_step=hf.get("decoder_sparse_step", 1) or 1,
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        mtp_layers=hf.get("mtp_num_hidden_layers") or 0,
        hf_extra=json.dumps(extra, sort_keys=True),
    )


def _hybrid_fields(hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    types = hf.get("layer_types")
    if not types:  # older configs: every `full_attention_interval`-th layer is full attention
        interval = hf.get("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                 for i in range(num_layers)]
    out = {k: hf[k] for k in _LINEAR_KEYS if k in hf}
    return dict(out, layer_types=tuple(types), attention_output_gate=True, norm_zero_centered=True)


_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
}


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    extra = cfg.extra
    wrapper = extra.pop(WRAPPER_KEY, None)
    extra.pop(FUSED_EXPERTS_KEY, None)
    if wrapper is not None:
        text = _to_hf(cfg.replace(hf_extra=json.dumps(extra, sort_keys=True)))
        text.pop("architectures", None)
        return {**wrapper, "text_config": text}
    fam = _FAMILIES[cfg.model_type]
    out: dict[str, Any] = dict(extra)
    out.update(
        architectures=[_ARCHITECTURES[cfg.model_type]],
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=cfg.rope.to_hf(),
        hidden_act="silu",
        use_sliding_window=False,
        layer_types=list(cfg.attention_types),
    )
    if fam.get("hybrid"):
        out.update({k: getattr(cfg, k) for k in _LINEAR_KEYS})
    if cfg.mtp_layers:
        out["mtp_num_hidden_layers"] = cfg.mtp_layers
    for name in ("qkv_bias", "o_bias"):
        spec = fam[name]
        if isinstance(spec, str):
            out[spec] = getattr(cfg, name)
    if fam["moe"]:
        out[fam["moe"]] = cfg.num_experts
        out.update(
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
        )
        if "norm_topk_prob" not in fam:
            out["norm_topk_prob"] = cfg.norm_topk_prob
        if fam.get("sparse_step", True):
            out.update(decoder_sparse_step=cfg.decoder_sparse_step,
                       mlp_only_layers=list(cfg.mlp_only_layers))
        if cfg.shared_expert_intermediate_size:
            out["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    return out


def yarn_attention_factor(rope: RopeConfig) -> float:
    """The cos/sin scale YaRN applies (HF `_compute_yarn_parameters`)."""
    if rope.attention_factor is not None:
        return rope.attention_factor

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return get_mscale(rope.factor, rope.mscale) / get_mscale(rope.factor, rope.mscale_all_dim)
    return get_mscale(rope.factor)
