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
handle too. Routed experts are fused parameters in `transformers` 5 (not linear modules), which
PEFT's `target_modules` cannot adapt: a model with expert adapters exports merged only.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from qwenjax.atomic import output_dir
from qwenjax.errors import ConversionError
from qwenjax.experiment import LoRAConfig
from qwenjax.hf.names import TensorMap
from qwenjax.model.lora import SUFFIX_B
from qwenjax.paths import as_path

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _entries(model, lora: LoRAConfig) -> list[tuple[TensorMap, list[str]]]:
    """Every adapted HF linear of `model` with its B variable names, one per layer."""
    from qwenjax.train.lora import adapter_groups

    out = []
    for group in adapter_groups(model.config, lora):
        if ".experts." in group[0].hf_name:
            raise ConversionError(
                "expert adapters have no PEFT form (transformers keeps experts fused, which "
                "PEFT's target_modules cannot adapt); export them merged (--merge)")
        out += [(e, [t.param[-1] + SUFFIX_B for t in e.targets]) for e in group]
    return out


def _vars(model, entry: TensorMap):
    from qwenjax.train.lora import _module

    module = _module(model, entry.targets[0].param[:-1])
    a_name = next(v.get_metadata("lora_a") for n, v in vars(module).items()
                  if n == entry.targets[0].param[-1] + SUFFIX_B)
    return module, a_name


def adapter_tensors(model, lora: LoRAConfig) -> dict[str, np.ndarray]:
    """PEFT tensor name -> fp32 array for every adapted linear of `model`."""
    params = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    r = lora.rank
    out = {}
    for entry, b_names in _entries(model, lora):
        module, a_name = _vars(model, entry)
        (i,) = entry.targets[0].index
        a = np.asarray(getattr(module, a_name)[...][i], np.float32)  # [*in, r]
        name = PREFIX + entry.hf_name[: -len(".weight")]
        out[name + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        kernels = []
        for t, b_name in zip(entry.targets, b_names):
            shape = params[t.param][...].shape[1:]
            b = np.asarray(getattr(module, b_name)[...][i], np.float32)  # [r, *out]
            n_in = math.prod(shape) // math.prod(b.shape[1:])
            k = np.zeros((n_in, math.prod(b.shape[1:])), np.float32)
            k[:r] = b.reshape(r, -1)
            kernels.append(k.reshape(shape))
        out[name + ".lora_B.weight"] = np.ascontiguousarray(entry.to_hf(*kernels)[:, :r])
    return out


def save_peft_adapter(model, out_dir: str | os.PathLike, lora: LoRAConfig, *,
                      base_model: str = "", overwrite: bool = False, inputs=()) -> os.PathLike:
    """Write `model`'s adapters as a PEFT LoRA adapter directory (qwenjax.atomic rules)."""
    tensors = adapter_tensors(model, lora)
    modules = sorted({n.split(".")[-3] for n in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }
    with output_dir(as_path(out_dir), "peft-adapter", overwrite=overwrite, inputs=inputs) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def read_peft_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory (LoRA, no bias, no DoRA/rsLoRA)."""
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
    return LoRAConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]), targets=list(targets))


def load_peft_adapter(model, adapter_dir: str | os.PathLike, seed: int = 0) -> LoRAConfig:
    """Add the adapters of a PEFT directory to `model` (in place), every tensor checked."""
    from qwenjax.train.lora import add_adapters

    lora = read_peft_config(adapter_dir)
    add_adapters(model, lora, seed)
    tensors = load_file(str(as_path(adapter_dir) / WEIGHTS))
    want = set(adapter_tensors(model, lora))
    missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or extra:
        raise ConversionError(f"{adapter_dir}: missing adapter tensors {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    r = lora.rank
    params = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for entry, b_names in _entries(model, lora):
        module, a_name = _vars(model, entry)
        (i,) = entry.targets[0].index
        name = PREFIX + entry.hf_name[: -len(".weight")]
        a_hf, b_hf = tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"]
        a_var = getattr(module, a_name)
        if a_hf.shape != (r, entry.hf_shape[-1]) or b_hf.shape != (entry.hf_shape[0], r):
            raise ConversionError(f"{name}: lora_A {list(a_hf.shape)} / lora_B "
                                  f"{list(b_hf.shape)} do not fit rank {r} and {entry.hf_shape}")
        a_var.set_value(a_var[...].at[i].set(a_hf.T.reshape(a_var[...].shape[1:])))
        w = np.zeros(entry.hf_shape, np.float32)
        w[:, :r] = b_hf
        for t, b_name in zip(entry.targets, b_names):
            k = t.to_ours(w)
            b_var = getattr(module, b_name)
            n_in = math.prod(params[t.param][...].shape[1:]) // math.prod(b_var[...].shape[2:])
            b = k.reshape(n_in, -1)[:r].reshape(b_var[...].shape[1:])
            b_var.set_value(b_var[...].at[i].set(b))
    return lora
