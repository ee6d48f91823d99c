"""Prompts of an exact length in tokens with needles at requested depths.

    prompt = prefix + haystack + question,   len(prompt) == length exactly
    haystack = filler tokens with each needle inserted at a sentence boundary

The filler budget is what the prefix, question and needles leave of `length`. It is the *last*
`budget` tokens of a sentence stream — the first sentence may start mid-way, like a window into a
long text — so no sentence is cut before the question. A needle with depth d goes to the sentence
boundary nearest to d * budget filler tokens; its realised depth (filler tokens before it /
budget) is returned and is within one sentence of the request:
|realised - d| <= max_sentence_tokens / budget.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from qwenjax.errors import ConfigError
from qwenjax.evals.filler import SentenceSource


@dataclass(frozen=True)
class Needle:
    tokens: list[int]
    depth: float  # requested: fraction of the filler before the needle, 0 (start) .. 1 (end)


@dataclass(frozen=True)
class Haystack:
    tokens: list[int]  # the whole prompt
    needle_starts: list[int]  # index in `tokens` of each needle's first token, in input order
    depths: list[float]  # realised depth of each needle, in input order
    budget: int  # filler tokens


def filler_window(
    source: SentenceSource, budget: int, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """(the last `budget` tokens of a sentence stream, the sentence boundaries in it: 0, every
    sentence start inside the window, budget)."""
    stream = source.stream(budget, rng) if budget > 0 else []
    flat = [t for s in stream for t in s]
    cut = len(flat) - budget
    starts = np.cumsum([0] + [len(s) for s in stream[:-1]]) - cut if stream else np.zeros(0)
    bounds = sorted({0, budget, *(int(b) for b in starts if 0 < b < budget)})
    return flat[cut:], bounds


def build(
    length: int,
    prefix: list[int],
    question: list[int],
    needles: list[Needle],
    source: SentenceSource,
    rng: np.random.Generator,
    *,
    what: str = "prompt",
) -> Haystack:
    """A prompt of exactly `length` tokens (see the module docstring)."""
    budget = length - len(prefix) - len(question) - sum(len(n.tokens) for n in needles)
    if budget < 0:
        raise ConfigError(
            f"eval.lengths: {length} tokens is too short for {what} "
            f"(needs at least {length - budget} without any filler)"
        )
    filler, bounds = filler_window(source, budget, rng)
    # Nearest boundary to each needle's target; equal depths keep the input order.
    place = []
    for n in needles:
        target = n.depth * budget
        k = bisect.bisect_left(bounds, target)
        near = min(bounds[max(0, k - 1) : k + 1], key=lambda b: (abs(b - target), b))
        place.append(near)
    order = sorted(range(len(needles)), key=lambda i: (place[i], needles[i].depth, i))
    tokens, starts, at = list(prefix), [0] * len(needles), 0
    for i in order:
        tokens += filler[at : place[i]]
        at = place[i]
        starts[i] = len(tokens)
        tokens += needles[i].tokens
    tokens += filler[at:] + question
    assert len(tokens) == length, (len(tokens), length)
    depths = [p / budget if budget else 0.0 for p in place]
    return Haystack(tokens, starts, depths, budget)
