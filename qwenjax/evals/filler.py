"""Offline haystack text: sentence streams (pre-tokenised) and a word pool, all from a seed.

Long-context benchmarks hide needles in natural prose (Paul Graham's essays in NIAH, PG-19 in
perplexity studies). None of that exists offline, but every CPython ships its reference
documentation as prose: `pydoc_data.topics` (~460 KB, the text `help()` shows). Its paragraphs
of English (code blocks and grammar rules dropped) make the "essay" filler. The "repeat" filler
is the original passkey test's five sentences, the text `qwenjax.data.passkey` trains on.

Sentences are tokenised one by one, each with its leading space, so a haystack is assembled
from whole token lists and its length in tokens is exact by construction (the Qwen pre-tokenizer
splits before a leading space, so this is also the tokenisation of the joined text, up to rare
merges across a sentence edge).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from qwenjax.data.passkey import FILLER_SENTENCES
from qwenjax.data.tokenizer import Tokenizer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@functools.cache
def essay_sentences() -> tuple[str, ...]:
    """English sentences of Python's `help()` topics, in document order, each with a leading
    space; the passkey sentences where `pydoc_data` is not installed (stripped Pythons)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - CPython always ships it
        return FILLER_SENTENCES
    out = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            lines = para.splitlines()
            # Indented lines are code, grammar or tables; headings are underlined with *, =, -.
            if any(line.startswith(" ") or set(line.strip()) <= set("*=-") for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            for s in _SENTENCE_END.split(text):
                letters = sum(c.isalpha() or c == " " for c in s)
                if 30 <= len(s) <= 300 and letters >= 0.85 * len(s):
                    out.append(" " + s)
    return tuple(out)


@functools.cache
def word_pool() -> tuple[str, ...]:
    """Distinct lowercase words (4-9 letters) of the essay text, sorted: needle keys for NIAH
    and the vocabulary of common-word extraction."""
    words = {w for s in essay_sentences() for w in re.findall(r"\b[a-z]{4,9}\b", s)}
    return tuple(sorted(words))


class SentenceSource:
    """The sentences of one filler kind, tokenised once, served as streams from a seed."""

    def __init__(self, tokenizer: Tokenizer, kind: str):
        if kind not in ("essay", "repeat"):
            raise ValueError(f"filler kind {kind!r} is not one of essay, repeat")
        self.kind = kind
        texts: Sequence[str] = essay_sentences() if kind == "essay" else FILLER_SENTENCES
        self.sentences = [tokenizer.encode(t) for t in texts]
        self.max_tokens = max(len(s) for s in self.sentences)

    def stream(self, n_tokens: int, rng: np.random.Generator) -> list[list[int]]:
        """Consecutive sentences (cycling, from a random one) holding at least `n_tokens`."""
        i = int(rng.integers(len(self.sentences))) if self.kind == "essay" else 0
        out, total = [], 0
        while total < n_tokens:
            s = self.sentences[i % len(self.sentences)]
            out.append(s)
            total += len(s)
            i += 1
        return out
