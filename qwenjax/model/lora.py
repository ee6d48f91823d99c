"""LoRA adapters inside the model: the variable kind and the fold that applies them.

An adapted kernel W (our layout: its input dims, then its output dims, after the stacked
`layers` (and `experts`) dims) gets W + scale * A @ B, with A [..., *in, r] and B [..., r, *out]
held beside it in the same module: `<hf module>_lora_a` (one A per Hugging Face linear, shared by
the kernels it feeds: Qwen3.5's q_proj feeds our q_kernel and gate_kernel, its in_proj_qkv our
q/k/v kernels) and `<kernel>_lora_b` for each kernel, whose metadata names its A and the scale
alpha / r. They are `LoRAParam`s, so `nnx.split(model, LoRAParam, ...)` separates what trains
from the frozen base; A and B carry logical axes from the dims they attach to (A: W's input
axes, B: W's output axes; the rank axis is unsplit), so they shard like W.

The fold runs inside the layer scan on one layer's slice of the stacks (`fold_lora(block)`):
the adapted weight exists for one layer at a time, like the compute-dtype cast of W. Folding
costs r * |W| multiply-adds per layer and step, small next to the T * |W| of the matmul, and
keeps every layer's code unaware of adapters; gradients reach A and B through the sum.

Dropout on the adapter input (PEFT's `lora_dropout`: W x + scale * B A drop(x)) has no folded
form, so in training with `lora.dropout` > 0 each projection adds what the fold got wrong:
`dropout_branch(y, x, ...)` = y + scale * ((drop(x) - x) @ A) @ B, two rank-r products, with one
mask per adapter (A) and layer, so kernels sharing an A (Qwen3.5's q_proj -> q and gate) see the
same dropped input, as PEFT's one module does. Routed experts take no dropout (neither does
PEFT's ParamWrapper for fused expert parameters); the config refuses the combination.

Dimension letters: r rank, L layers, E experts.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import zlib
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


class LoRAParam(nnx.Param):
    """A trainable adapter matrix (the base's `nnx.Param`s stay frozen when it is used)."""


def adapted(module: nnx.Module) -> list[tuple[str, str, float, int]]:
    """(kernel name, A name, scale, leading dims) of every adapted kernel of `module`."""
    out = []
    for name, value in vars(module).items():
        if isinstance(value, LoRAParam) and name.endswith(SUFFIX_B):
            out.append((name[: -len(SUFFIX_B)], value.get_metadata("lora_a"),
                        float(value.get_metadata("scale")), int(value.get_metadata("lead"))))
    return out


@dataclass
class _Dropout:
    key: jax.Array  # this forward's key (one per step and micro-batch)
    rate: float
    modules: dict = field(default_factory=dict)  # id(module) -> that module's key in this layer


_DROPOUT: contextvars.ContextVar[_Dropout | None] = contextvars.ContextVar("lora_dropout",
                                                                          default=None)


@contextlib.contextmanager
def adapter_dropout(key, rate: float):
    """Within: the forward being traced drops adapter inputs at `rate` (training only)."""
    token = _DROPOUT.set(_Dropout(key, rate) if rate > 0 else None)
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def _salt(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def fold_lora(block: nnx.Module, *, stacked: bool = False, remove: bool = False,
              layer=None) -> None:
    """Replace, in place, every adapted kernel of `block` by W + scale * A @ B. Inside the layer
    scan (one layer's slice, `stacked=False`) the sum is fp32 and layers cast it to the compute
    dtype as they do W. `stacked=True` folds a whole model's stacks (`layers` leading) and keeps
    W's dtype; `remove` then deletes the adapters (a merged model, as `transformers` has it).
    `layer` (the block's traced layer index) keys adapter dropout, when active, per layer and
    module path."""
    dropout = _DROPOUT.get()
    for path, module in list(nnx.iter_graph(block)):
        if not isinstance(module, nnx.Module):
            continue
        if dropout is not None and layer is not None and adapted(module):
            key = jax.random.fold_in(dropout.key, layer)
            dropout.modules[id(module)] = jax.random.fold_in(
                key, _salt("/".join(map(str, path))))
        for kernel, a_name, scale, lead in adapted(module):
            w = getattr(module, kernel)
            a, b = getattr(module, a_name)[...], getattr(module, kernel + SUFFIX_B)[...]
            delta = scale * contract(a.astype(F32), b.astype(F32), lead + stacked)
            merged = w[...].astype(F32) + delta
            w.set_value(merged.astype(w[...].dtype) if stacked else merged)
            if remove:
                delattr(module, kernel + SUFFIX_B)
        if remove:
            for name in [n for n, v in vars(module).items() if isinstance(v, LoRAParam)]:
                delattr(module, name)


def module_key(module: nnx.Module):
    """`module`'s dropout key in the layer being traced (None when dropout is off)."""
    dropout = _DROPOUT.get()
    return None if dropout is None else dropout.modules.get(id(module))


def dropout_mask(key, a_name: str, shape, rate: float):
    """The keep mask adapter `a_name` applies to its input (True = kept)."""
    return jax.random.bernoulli(jax.random.fold_in(key, _salt(a_name)), 1.0 - rate, shape)


def dropout_branch(y, x, module: nnx.Module, kernel: str):
    """y = x @ W' of an adapted projection (W' folded), plus scale * ((drop(x) - x) @ A) @ B when
    adapter dropout is active, so the sum is PEFT's x W + scale * drop(x) A B. x [..., *in] and
    y [..., *out] share their leading dims; without dropout or adapter, y as it is."""
    dropout = _DROPOUT.get()
    b = getattr(module, kernel + SUFFIX_B, None)
    if dropout is None or b is None or id(module) not in dropout.modules:
        return y
    a_name, scale = b.get_metadata("lora_a"), float(b.get_metadata("scale"))
    a = getattr(module, a_name)[...].astype(x.dtype)
    keep = dropout_mask(dropout.modules[id(module)], a_name, x.shape, dropout.rate)
    diff = jnp.where(keep, x / (1.0 - dropout.rate), 0).astype(x.dtype) - x
    u = jnp.tensordot(diff, a, a.ndim - 1)  # [..., r]
    return y + (scale * jnp.tensordot(u, b[...].astype(x.dtype), 1)).astype(y.dtype)


def contract(a, b, lead: int):
    """[*lead, *in, r] x [*lead, r, *out] -> [*lead, *in, *out] (the first `lead` dims shared)."""
    r = a.shape[-1]
    lead_shape, a_in, b_out = a.shape[:lead], a.shape[lead:-1], b.shape[lead + 1:]
    a2 = a.reshape(*lead_shape, math.prod(a_in), r)
    b2 = b.reshape(*lead_shape, r, math.prod(b_out))
    return (a2 @ b2).reshape(*lead_shape, *a_in, *b_out)
