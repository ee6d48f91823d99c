"""Site names and capture: read named activations out of a forward pass (see model/hooks.py).

A site is written `blocks.L.NAME` (TransformerLens / SAELens style without the `hook_`), e.g.
`blocks.1.resid_post`; NAME is one of `qwenjax.model.hooks.SITES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.errors import ConfigError
from qwenjax.model import hooks
from qwenjax.model.transformer import CausalLM

Key = hooks.Key


def parse_site(text: str, num_layers: int | None = None) -> Key:
    """'blocks.1.resid_post' -> ('resid_post', 1); a wrong name is a ConfigError."""
    parts = str(text).split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ConfigError(f"site {text!r}: expected blocks.LAYER.NAME, e.g. blocks.1.resid_post")
    key = (parts[2], int(parts[1]))
    try:
        hooks.check_key(key, num_layers if num_layers is not None else key[1] + 1)
    except ValueError as e:
        raise ConfigError(f"site {text!r}: {e}") from None
    return key


def check_site(key: Key, model: CausalLM) -> Key:
    cfg = model.config
    hooks.check_key(key, cfg.num_layers)
    if key[0] == "router_logits" and cfg.mlp_types[key[1]] != "moe":
        raise ConfigError(f"site blocks.{key[1]}.router_logits: layer {key[1]} has no router")
    return key


def site_name(key: Key) -> str:
    return f"blocks.{key[1]}.{key[0]}"


def forward_with_hooks(
    model: CausalLM, input_ids, *, capture: Iterable[Key] = (),
    edits: Mapping[Key, Callable] | None = None, **kwargs,
):  # fmt: skip
    """(logits [B,T,V] fp32, {site: value}) — call inside a traced function or eagerly."""
    with hooks.hooks(capture, edits) as h:
        logits = model(input_ids, **kwargs)
    return logits, dict(h.values)


def hidden_with_hooks(model: CausalLM, input_ids, *, capture=(), edits=None, **kwargs):
    """(final hidden states [B,T,D], {site: value}) — as `forward_with_hooks` without the head."""
    with hooks.hooks(capture, edits) as h:
        hidden, _ = model.hidden_states(input_ids, **kwargs)
    return hidden, dict(h.values)


def capture_fn(model: CausalLM, sites: Iterable[Key]):
    """A jitted `(input_ids [B,T], positions, segment_ids) -> {site: activations}` (positions and
    segment ids optional, as for the model); the final norm is dead code XLA removes."""
    sites = tuple(check_site(k, model) for k in sites)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, positions, segment_ids):
        _, values = hidden_with_hooks(nnx.merge(graphdef, state), ids, capture=sites,
                                      positions=positions, segment_ids=segment_ids)
        return values

    def call(ids, positions=None, segment_ids=None):
        as_int = lambda a: None if a is None else jnp.asarray(a, jnp.int32)
        return run(state, as_int(ids), as_int(positions), as_int(segment_ids))

    return call
