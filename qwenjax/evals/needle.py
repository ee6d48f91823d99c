"""Single-needle retrieval: passkey, and RULER-style needle-in-a-haystack (single and multi-key).

- passkey: the prompt of Mohtashami & Jaggi (2023) — a 5-digit key in filler text, asked for at
  the end. The strings are `qwenjax.data.passkey`'s, the documents a model can be trained on.
- niah_single: one "special magic number" for a word-pair key (RULER's niah_single_2 phrasing);
  the answer is a 7-digit number.
- niah_multikey: `num_keys` such needles with different keys; the one asked for is at the
  requested depth, the distractors at random depths (RULER's niah_multikey_1).

Prompts end where the answer starts, so a base model continues with it and an instruct model
may too; no chat template is applied.
"""

from __future__ import annotations

import numpy as np

from qwenjax.data.passkey import (
    KEY_DIGITS,
    PASSKEY_NEEDLE,
    PASSKEY_PREFIX,
    PASSKEY_QUESTION,
    random_key,
)
from qwenjax.evals import haystack
from qwenjax.evals.tasks import Sample, TaskContext

NIAH_PREFIX = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards."
)
NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = (
    " What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
NIAH_DIGITS = 7


def passkey(ctx: TaskContext, length: int, depth: float, rng: np.random.Generator) -> Sample:
    key = random_key(rng)
    needle = haystack.Needle(ctx.encode(PASSKEY_NEEDLE.format(key=key)), depth)
    hay = haystack.build(
        length,
        ctx.encode(PASSKEY_PREFIX),
        ctx.encode(PASSKEY_QUESTION),
        [needle],
        ctx.sentences,
        rng,
        what="passkey",
    )
    # " 12345." is at most a token per digit plus the space and the full stop.
    return Sample(
        "passkey",
        length,
        depth,
        hay.tokens,
        [key],
        KEY_DIGITS + 3,
        {"key": key, "realised_depth": hay.depths[0], "needle_start": hay.needle_starts[0]},
    )


def _keys(ctx: TaskContext, rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct word-pair keys, e.g. "protocol-shadow"."""
    keys: set[str] = set()
    words = ctx.words
    while len(keys) < n:
        a, b = rng.choice(len(words), 2, replace=False)
        keys.add(f"{words[a]}-{words[b]}")
    # Sorted first: set order varies between processes (string hashing is salted).
    return [sorted(keys)[i] for i in rng.permutation(len(keys))]


def _niah(
    task: str, ctx: TaskContext, length: int, depth: float, rng: np.random.Generator, num_keys: int
) -> Sample:
    keys = _keys(ctx, rng, num_keys)
    values = [random_key(rng, NIAH_DIGITS) for _ in keys]
    # Needle 0 is the one asked for, at the requested depth; distractors anywhere.
    depths = [depth] + [float(rng.random()) for _ in keys[1:]]
    needles = [
        haystack.Needle(ctx.encode(NIAH_NEEDLE.format(key=k, value=v)), d)
        for k, v, d in zip(keys, values, depths)
    ]
    hay = haystack.build(
        length,
        ctx.encode(NIAH_PREFIX),
        ctx.encode(NIAH_QUESTION.format(key=keys[0])),
        needles,
        ctx.sentences,
        rng,
        what=task,
    )
    return Sample(
        task,
        length,
        depth,
        hay.tokens,
        [values[0]],
        NIAH_DIGITS + 4,
        {
            "key": keys[0],
            "value": values[0],
            "realised_depth": hay.depths[0],
            "needle_start": hay.needle_starts[0],
            "distractors": num_keys - 1,
        },
    )


def niah_single(ctx: TaskContext, length: int, depth: float, rng: np.random.Generator) -> Sample:
    return _niah("niah_single", ctx, length, depth, rng, 1)


def niah_multikey(ctx: TaskContext, length: int, depth: float, rng: np.random.Generator) -> Sample:
    return _niah("niah_multikey", ctx, length, depth, rng, ctx.num_keys)
