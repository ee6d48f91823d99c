"""Hook points: named activation sites a forward pass can read (capture) or rewrite (edit).

Sites of decoder layer l (0-based, global index), all [B,T,D] in the compute dtype unless said:
  resid_pre     the residual stream entering the layer
  attn_out      the token mixer's output before the residual add: full attention, or the Gated
                DeltaNet output in linear-attention layers
  mlp_out       the dense MLP or MoE block output (shared expert included) before the add
  resid_post    the residual stream leaving the layer
  router_logits MoE layers only: [B,T,E] fp32, before softmax / top-k

The layers call `tap(name, value)`; without active hooks it returns `value` untouched (one
context-variable read at trace time, nothing in the program). Layers are scanned, so a layer's
index is known only inside the scan: `LayerStack` opens a `frame` per scan step with the traced
repeat index, `Block` names the slot, and a requested site is selected with
`where(repeat == r, ...)`. Captured values ride in the scan carry, one [B,T,D] buffer per
requested site (not one per layer), and come out as the forward's own values, in its layout and
sharding (under `context` parallelism: the token layout the model was given).

Edits (`fn(value) -> value`) replace a site's value in the forward: spliced-in SAE
reconstructions, zero ablation, steering. They work in `__call__` and in `extend` (generation);
captures only in `__call__`.

Use inside the traced function:
    with hooks(capture=[("resid_post", 1)]) as h:
        logits = model(ids)
    acts = h.values[("resid_post", 1)]
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post", "router_logits")
Key = tuple[str, int]  # (site, layer)


@dataclass
class Hooks:
    capture: tuple[Key, ...] = ()
    edits: Mapping[Key, Callable[[jax.Array], jax.Array]] = field(default_factory=dict)
    values: dict[Key, jax.Array] = field(default_factory=dict)  # filled by the forward

    def captures_in(self, first: int, period: int, repeats: int) -> list[Key]:
        return [k for k in self.capture if first <= k[1] < first + period * repeats]


class Frame:
    """One scan step of one layer stack: which layers it runs, and the capture buffers."""

    def __init__(self, hooks: Hooks, first: int, period: int, repeats: int, repeat, buffers: dict):
        self.hooks, self.first, self.period, self.repeat = hooks, first, period, repeat
        self.end = first + period * repeats
        self.buffers = buffers
        self.slot = 0


_HOOKS: contextvars.ContextVar[Hooks | None] = contextvars.ContextVar("qwenjax_hooks", default=None)
_FRAME: contextvars.ContextVar[Frame | None] = contextvars.ContextVar("qwenjax_frame", default=None)


def check_key(key: Key, num_layers: int) -> Key:
    site, layer = key
    if site not in SITES:
        raise ValueError(f"unknown hook site {site!r}; sites are {', '.join(SITES)}")
    if not 0 <= layer < num_layers:
        raise ValueError(f"hook layer {layer} out of range: the model has {num_layers} layers")
    return key


@contextlib.contextmanager
def hooks(capture: Iterable[Key] = (), edits: Mapping[Key, Callable] | None = None):
    """Make hooks active for the forward passes traced inside (see the module docstring).
    Nested inside other hooks, it adds to them: captures of both, edits of both (the inner one
    wins on a shared site), and values reported to both."""
    outer = _HOOKS.get()
    h = Hooks(tuple(capture), dict(edits or {}))
    if outer is not None:
        h = Hooks(outer.capture + h.capture, {**outer.edits, **h.edits}, outer.values)
    token = _HOOKS.set(h)
    try:
        yield h
    finally:
        _HOOKS.reset(token)


def active() -> Hooks | None:
    return _HOOKS.get()


@contextlib.contextmanager
def frame(first: int, period: int, repeats: int, repeat, buffers: dict):
    """Inside one scan step of a layer stack (`repeat` is the traced repeat index)."""
    h = _HOOKS.get()
    if h is None:
        yield None
        return
    f = Frame(h, first, period, repeats, repeat, buffers)
    token = _FRAME.set(f)
    try:
        yield f
    finally:
        _FRAME.reset(token)


def set_slot(slot: int) -> None:
    """The layer about to run is slot `slot` of the current block."""
    f = _FRAME.get()
    if f is not None:
        f.slot = slot


def tap(site: str, value: jax.Array) -> jax.Array:
    """A named site: captured into the frame's buffer and/or edited if requested."""
    f = _FRAME.get()
    if f is None:
        return value
    for key in list(f.buffers) + [k for k in f.hooks.edits if k not in f.buffers]:
        if key[0] != site or not f.first <= key[1] < f.end:
            continue
        if (key[1] - f.first) % f.period != f.slot:
            continue
        hit = f.repeat == (key[1] - f.first) // f.period
        if key in f.buffers:
            f.buffers[key] = jnp.where(hit, value, f.buffers[key])
        if key in f.hooks.edits:
            value = jnp.where(hit, f.hooks.edits[key](value).astype(value.dtype), value)
    return value


def buffer_like(site: str, x: jax.Array, num_experts: int) -> jax.Array:
    """A zero capture buffer for `site`, given the hidden states x [B,T,D] entering the stack."""
    if site == "router_logits":
        return jnp.zeros((*x.shape[:2], num_experts), jnp.float32)
    return jnp.zeros_like(x)
