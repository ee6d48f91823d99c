"""Choosing the next token from logits: greedy, or temperature with top-k and top-p (nucleus).

The filters are applied in the order `transformers` applies its logits warpers (temperature,
then top-k, then top-p), so the same settings mean the same distribution. Everything is
traceable with static settings, for use inside a jitted decode loop.

Dimension letters: B batch, V vocab.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.errors import GenerationError


class Sampling(NamedTuple):
    """Sampling settings. Only `greedy` is static: the numbers are traced, so changing them
    does not recompile the decode loop."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter

    def check(self) -> Sampling:
        """The settings as Python numbers; GenerationError (a QwenJaxError) if one is out of
        range. Written so that NaN fails every test."""
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise GenerationError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        if not _is_number(self.top_k, integer=True) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        return Sampling(float(self.temperature), int(self.top_k), float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def arrays(self) -> Sampling:
        """The settings as device scalars, to pass into a jitted function."""
        return Sampling(
            jnp.float32(max(self.temperature, 1e-6)), jnp.int32(self.top_k), jnp.float32(self.top_p)
        )


def _is_number(x, *, integer: bool = False) -> bool:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    return isinstance(x, kinds) and not isinstance(x, bool)


def filter_logits(logits, s: Sampling):
    """Scaled and filtered logits [B,V] (removed tokens at -inf); temperature > 0. Traceable in
    all three settings. Tokens tied with the last kept one are kept too."""
    logits = logits.astype(jnp.float32) / s.temperature
    V = logits.shape[-1]
    ranked = -jnp.sort(-logits, axis=-1)  # [B,V] descending
    kth = jnp.take(ranked, jnp.clip(s.top_k - 1, 0, V - 1), axis=-1)[:, None]
    kth = jnp.where(s.top_k > 0, kth, -jnp.inf)
    ranked = jnp.where(ranked < kth, -jnp.inf, ranked)
    # Nucleus: keep the most probable tokens whose probability mass before them is < top_p (the
    # smallest set reaching top_p; always the most probable token), i.e. every logit >= `cut`.
    probs = jax.nn.softmax(ranked, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs < s.top_p) | (s.top_p >= 1.0)
    cut = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < jnp.maximum(cut, kth), -jnp.inf, logits)


def sample(logits, key, s: Sampling, greedy: bool):
    """logits [B,V] -> token ids [B] int32. `greedy` is static; `key` is unused when greedy."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, s), axis=-1).astype(jnp.int32)
