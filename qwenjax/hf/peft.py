"""PEFT LoRA adapter directories <-> a model's LoRA variables (qwenjax/model/lora.py).

A PEFT adapter directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha,
target_modules ...) and `adapter_model.safetensors` with, per adapted HF linear `M`,
`base_model.model.M.lora_A.weight` [r, in_features] and `base_model.model.M.lora_B.weight`
[out_features, r]; PEFT adds scaling * B @ A (scaling = lora_alpha / r) to M's weight [out, in].

Our A [*in, r] flattens to HF's input order directly (every layout in `hf/names.py` keeps the
input dims row-major). B is split over the kernels the HF module feeds (q and gate, or q, k, v)
in their own layouts; rather than a second set of layout maps, B goes through the weight's own
`to_hf` / `to_ours`: laid into the first r input rows of zero kernels it becomes the first r
columns of the HF weight, and back. So every layout the import/export table handles, adapters
handle too.

Routed experts are fused 3-D parameters in `transformers` 5, not linear modules: their adapters
are computed here one linear per expert and written in PEFT's `target_parameters` form
(hf/peft_experts.py, exact). In a MoE model the dense and shared-expert MLP adapters go under
`target_parameters` too (`gate_proj.weight` ...: same tensors and names as a module target),
because PEFT 0.21 reroutes `target_modules` gate/up/down_proj of Qwen3-MoE / Qwen3-Next models
onto the fused experts and would leave those MLPs unadapted.
"""

from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from qwenjax.atomic import output_dir
from qwenjax.errors import ConversionError
from qwenjax.experiment import LoRAConfig
from qwenjax.hf.peft_experts import DOWN, GATE_UP, fuse_experts, split_experts
from qwenjax.model.lora import SUFFIX_B
from qwenjax.paths import as_path

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MLP = ("gate_proj", "up_proj", "down_proj")


def _entries(model, lora: LoRAConfig) -> list[tuple]:
    """Every adapted HF linear of `model`, one per layer (and expert): (table entry, the module
    holding its adapter, A's name, B's names)."""
    from qwenjax.train.lora import _module, adapter_groups

    out = []
    for group in adapter_groups(model.config, lora):
        module = _module(model, group[0].targets[0].param[:-1])
        b_names = [t.param[-1] + SUFFIX_B for t in group[0].targets]
        a_name = getattr(module, b_names[0]).get_metadata("lora_a")
        out += [(entry, module, a_name, b_names) for entry in group]
    return out


class _Arrays:
    """fp32 numpy copies of adapter variables, made once each (a stack is read or filled entry by
    entry), and written back together by `store`."""

    def __init__(self):
        self.held = {}

    def __call__(self, module, name: str) -> np.ndarray:
        key = (id(module), name)
        if key not in self.held:
            self.held[key] = (module, name, np.array(getattr(module, name)[...], np.float32))
        return self.held[key][2]

    def store(self):
        for module, name, a in self.held.values():
            getattr(module, name).set_value(jnp.asarray(a))


def _kernel_shape(module, t, index) -> tuple[int, ...]:
    return getattr(module, t.param[-1])[...].shape[len(index):]


def _linear_tensors(model, lora: LoRAConfig) -> dict[str, np.ndarray]:
    """PEFT tensor name -> fp32 array, one A and B per HF linear (experts: one per expert)."""
    r, arrays, out = lora.rank, _Arrays(), {}
    for entry, module, a_name, b_names in _entries(model, lora):
        index = entry.targets[0].index
        a = arrays(module, a_name)[index]  # [*in, r]
        name = PREFIX + entry.hf_name[: -len(".weight")]
        out[name + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        kernels = []
        for t, b_name in zip(entry.targets, b_names):
            shape = _kernel_shape(module, t, index)
            b = arrays(module, b_name)[index]  # [r, *out]
            k = np.zeros((math.prod(shape) // b[0].size, b[0].size), np.float32)
            k[:r] = b.reshape(r, -1)
            kernels.append(k.reshape(shape))
        out[name + ".lora_B.weight"] = np.ascontiguousarray(entry.to_hf(*kernels)[:, :r])
    return out


def _peft_config(names, lora: LoRAConfig, moe: bool, base_model: str) -> dict:
    """adapter_config.json for the per-linear adapter tensors `names` of a (MoE or dense) model."""
    modules = {n.split(".")[-3] for n in names if ".experts." not in n}
    as_params = {m for m in modules if moe and m in MLP}
    params = sorted(f"{m}.weight" for m in as_params)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(modules - as_params), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }
    if any(".experts." in n for n in names):
        params += [GATE_UP, DOWN]
        config["rank_pattern"] = {GATE_UP: 2 * lora.rank}
        config["alpha_pattern"] = {GATE_UP: 2 * lora.alpha}
    if params:
        config["target_parameters"] = params
    return config


def save_peft_adapter(model, out_dir: str | os.PathLike, lora: LoRAConfig, *,
                      base_model: str = "", overwrite: bool = False, inputs=()) -> os.PathLike:
    """Write `model`'s adapters as a PEFT LoRA adapter directory (qwenjax.atomic rules);
    routed experts fused as PEFT holds them."""
    linear = _linear_tensors(model, lora)
    E = model.config.num_experts
    tensors = fuse_experts(linear, E)
    config = _peft_config(list(linear), lora, E > 0, base_model)
    with output_dir(as_path(out_dir), "peft-adapter", overwrite=overwrite, inputs=inputs) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def read_peft_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory (LoRA, no bias, no DoRA/rsLoRA)."""
    return _read_config(adapter_dir)[0]


def _read_config(adapter_dir) -> tuple[LoRAConfig, int]:
    """(LoRAConfig, the experts' gate_up_proj rank: r or 2r; 0 without expert adapters)."""
    path = as_path(adapter_dir) / CONFIG
    if not path.is_file():
        raise ConversionError(f"{adapter_dir}: not a PEFT adapter directory (no {CONFIG})")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if c.get("peft_type") != "LORA" or c.get("use_dora") or c.get("use_rslora") or (
            c.get("bias", "none") != "none"):
        raise ConversionError(f"{path}: only plain LoRA adapters (no DoRA, rsLoRA or bias)")
    targets = c.get("target_modules") or []
    if isinstance(targets, str):
        raise ConversionError(f"{path}: target_modules as a regex is not supported")
    targets = list(targets)
    experts = set()
    for p in c.get("target_parameters") or []:
        leaf = p.split(".")[-1]
        if leaf in ("gate_up_proj", "down_proj"):
            experts.add(leaf)
        elif leaf == "weight" and "." in p:
            targets.append(p.split(".")[-2])
        else:
            raise ConversionError(f"{path}: target_parameters entry {p!r} is neither a linear's "
                                  "'<module>.weight' nor the experts' gate_up_proj / down_proj")
    if experts and len(experts) != 2:
        raise ConversionError(f"{path}: target_parameters adapt only {sorted(experts)}; qwenjax "
                              "adapts an expert's gate_up_proj and down_proj together")
    r, alpha = int(c["r"]), float(c["lora_alpha"])
    gate_up = (r, alpha) if experts else (0, 0.0)
    for key in {*(c.get("rank_pattern") or {}), *(c.get("alpha_pattern") or {})}:
        got = (int((c.get("rank_pattern") or {}).get(key, r)),
               float((c.get("alpha_pattern") or {}).get(key, alpha)))
        if experts and key.endswith("gate_up_proj"):
            gate_up = got
        elif got != (r, alpha):
            raise ConversionError(f"{path}: rank_pattern / alpha_pattern {key!r} gives rank "
                                  f"{got[0]}, alpha {got[1]}; qwenjax adapters share one rank "
                                  "(only the experts' gate_up_proj may have 2r, 2*alpha)")
    if experts and (gate_up[0] not in (r, 2 * r) or gate_up[1] / gate_up[0] != alpha / r):
        raise ConversionError(f"{path}: the experts' gate_up_proj has rank {gate_up[0]}, alpha "
                              f"{gate_up[1]}; qwenjax reads rank {r} or {2 * r} at scale "
                              f"{alpha / r} (alpha / r)")
    if experts:
        targets.append("experts")
    lora = LoRAConfig(rank=r, alpha=alpha, targets=list(dict.fromkeys(targets)))
    return lora, gate_up[0]


def load_peft_adapter(model, adapter_dir: str | os.PathLike, seed: int = 0) -> LoRAConfig:
    """Add the adapters of a PEFT directory to `model` (in place), every tensor checked."""
    from qwenjax.train.lora import add_adapters

    lora, gate_up_rank = _read_config(adapter_dir)
    add_adapters(model, lora, seed)
    tensors = load_file(str(as_path(adapter_dir) / WEIGHTS))
    if gate_up_rank:
        tensors = split_experts(tensors, model.config.num_experts, lora.rank, gate_up_rank)
    want = set(_linear_tensors(model, lora))
    missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or extra:
        raise ConversionError(f"{adapter_dir}: missing adapter tensors {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    r, arrays = lora.rank, _Arrays()
    for entry, module, a_name, b_names in _entries(model, lora):
        index = entry.targets[0].index
        name = PREFIX + entry.hf_name[: -len(".weight")]
        a_hf, b_hf = tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"]
        if a_hf.shape != (r, entry.hf_shape[-1]) or b_hf.shape != (entry.hf_shape[0], r):
            raise ConversionError(f"{name}: lora_A {list(a_hf.shape)} / lora_B "
                                  f"{list(b_hf.shape)} do not fit rank {r} and {entry.hf_shape}")
        a = arrays(module, a_name)
        a[index] = a_hf.T.reshape(a.shape[len(index):])
        w = np.zeros(entry.hf_shape, np.float32)
        w[:, :r] = b_hf
        for t, b_name in zip(entry.targets, b_names):
            b = arrays(module, b_name)
            n_in = math.prod(_kernel_shape(module, t, index)) // math.prod(b.shape[len(index) + 1:])
            b[index] = t.to_ours(w).reshape(n_in, -1)[:r].reshape(b.shape[len(index):])
    arrays.store()
    return lora
