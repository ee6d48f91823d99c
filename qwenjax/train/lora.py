"""LoRA fine-tuning: adding adapters to a model, splitting it into what trains and the frozen
base, merging adapters back, and rebuilding a LoRA run's model from its run directory.

Adapters attach to Hugging Face linear modules (`experiment.LoRAConfig.targets`: q, k, v, o,
gate, up, down, the Gated DeltaNet projections by their HF names, and `experts`), found through
the HF tensor table (`qwenjax.hf.names`), so one adapter is exactly what PEFT would put on that
module: one A of the module's input, one B over all of its output — split here over the kernels
the module feeds (see qwenjax/model/lora.py for the variables and the fold). Routed experts get
one adapter per expert (A [E, D or F, r], B [E, r, F or D]). Every layer in a stack gets its
own adapter, stacked on `layers` like the weights.

Init as PEFT's default: A uniform in +-1/sqrt(fan_in), B zero, so training starts at the base
model. Adapters are fp32 whatever the base's `param_dtype`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.experiment import LoRAConfig
from qwenjax.hf.names import TensorMap, tensor_table
from qwenjax.model.lora import SUFFIX_A, SUFFIX_B, LoRAParam, fold_lora
from qwenjax.model.partition import state_shardings

F32 = jnp.float32


def module_name(entry: TensorMap) -> str:
    """The HF module a linear weight belongs to: 'q_proj' for '...self_attn.q_proj.weight'."""
    return entry.hf_name.split(".")[-2]


def adapter_groups(cfg, lora: LoRAConfig) -> list[list[TensorMap]]:
    """The table entries to adapt, grouped by the (stacked) parameters they fill: one group per
    adapter variable set, its entries one per layer (and expert)."""
    wanted = lora.hf_modules()
    groups: dict[tuple, list[TensorMap]] = {}
    for entry in tensor_table(cfg, fused_experts=False):
        # Only the stacked decoder layers: not embeddings, norms, the head, nor the MTP module.
        if (not entry.targets[0].index or not entry.hf_name.endswith(".weight")
                or entry.targets[0].param[0] != "stacks"):
            continue
        is_expert = ".experts." in entry.hf_name
        if (is_expert and "experts" not in wanted) or (
                not is_expert and module_name(entry) not in wanted):
            continue
        groups.setdefault(tuple(t.param for t in entry.targets), []).append(entry)
    return list(groups.values())


def _module(model, path: tuple):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def in_dims(kernel_shape: tuple[int, ...], hf_in: int) -> int:
    """How many of a kernel's leading dims are its input: their product is HF's in_features."""
    for k in range(1, len(kernel_shape)):
        if math.prod(kernel_shape[:k]) == hf_in:
            return k
    raise ValueError(f"no input split of {kernel_shape} gives {hf_in}")


def add_adapters(model, lora: LoRAConfig, seed: int = 0) -> int:
    """Give `model` LoRA variables for `lora.targets`, in place. Returns how many groups."""
    groups = adapter_groups(model.config, lora)
    key = jax.random.key(seed + 7919)
    for n, group in enumerate(groups):
        first = group[0]
        lead = len(first.targets[0].index) - 1  # 1 for experts (per-expert adapters)
        module = _module(model, first.targets[0].param[:-1])
        hf_in = first.hf_shape[-1]
        kernels = [getattr(module, t.param[-1]) for t in first.targets]
        shape0 = kernels[0][...].shape
        k = in_dims(shape0[1 + lead:], hf_in)
        axes0 = kernels[0].get_metadata("axes")
        a_shape = (*shape0[:1 + lead + k], lora.rank)
        bound = 1.0 / math.sqrt(hf_in)
        a = jax.random.uniform(jax.random.fold_in(key, n), a_shape, F32, -bound, bound)
        a_name = (f"{module_name(first)}" if lead == 0 else f"experts_{module_name(first)}")
        setattr(module, a_name + SUFFIX_A, LoRAParam(a, axes=(*axes0[:1 + lead + k], None)))
        for t, w in zip(first.targets, kernels):
            shape, axes = w[...].shape, w.get_metadata("axes")
            b = jnp.zeros((*shape[:1 + lead], lora.rank, *shape[1 + lead + k:]), F32)
            setattr(module, t.param[-1] + SUFFIX_B, LoRAParam(
                b, axes=(*axes[:1 + lead], None, *axes[1 + lead + k:]), lora_a=a_name + SUFFIX_A,
                scale=lora.alpha / lora.rank, lead=lead))
    return len(groups)


def split_trainable(model, mesh=None, rules=None):
    """(graphdef, adapters, base): the adapters placed in their shardings on `mesh`."""
    graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
    if mesh is not None:
        adapters = jax.device_put(adapters, state_shardings(adapters, mesh, rules))
    return graphdef, adapters, base


def merge_adapters(model) -> None:
    """Fold every adapter into its kernel and remove the adapters, in place (the base dtype)."""
    fold_lora(model, stacked=True, remove=True)


def has_adapters(model) -> bool:
    return any(isinstance(v, LoRAParam) for _, v in nnx.iter_graph(model))


def trainable_counts(model) -> dict[str, int]:
    """Parameter counts: adapters and base."""
    counts = {"adapters": 0, "base": 0}
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        counts["adapters" if isinstance(v, LoRAParam) else "base"] += int(np.prod(v[...].shape))
    return counts
