"""What every generation task shares: the sample record, the context that builds samples, scoring.

A task is a function `(ctx, length, depth, rng) -> Sample`: a prompt of `length` tokens whose
answer strings the model must produce. Scoring is RULER's `string_match_all`: the fraction of a
sample's answers that appear in the model's output as whole words (so "12345" is not found in
"123456"), case-insensitive. Passkey and needle tasks have one answer, so a sample scores 0 or 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwenjax.data.tokenizer import Tokenizer
from qwenjax.evals.filler import SentenceSource, word_pool


@dataclass
class Sample:
    task: str
    length: int  # requested prompt length in tokens (== len(prompt))
    depth: float | None  # requested needle depth; None for tasks without a depth axis
    prompt: list[int]
    answers: list[str]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)  # realised depths, keys, ...


@dataclass
class TaskContext:
    tokenizer: Tokenizer
    sentences: SentenceSource
    num_keys: int = 4  # niah_multikey

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    @property
    def words(self) -> tuple[str, ...]:
        return word_pool()


def score(output: str, answers: list[str]) -> float:
    """Fraction of `answers` found in `output` as whole words, ignoring case."""
    if not answers:
        return 0.0
    found = sum(
        re.search(rf"(?<!\w){re.escape(a)}(?!\w)", output, re.IGNORECASE) is not None
        for a in answers
    )
    return found / len(answers)


def sample_rng(seed: int, task: str, length: int, depth_index: int, index: int):
    """The generator of one sample: the same (seed, task, cell, index) gives the same prompt."""
    salt = sum(ord(c) * 31**i for i, c in enumerate(task)) % (2**31)
    return np.random.default_rng([seed, salt, length, depth_index, index])
