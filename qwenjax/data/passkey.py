"""Synthetic passkey documents: the training data that teaches a tiny model to retrieve a number.

Each document is the passkey-retrieval prompt of Mohtashami & Jaggi (2023, "Landmark Attention")
followed by its answer, so a model trained on them with the ordinary next-token loss learns to
copy the key from wherever it sits back to the end:

    PREFIX  filler ... NEEDLE(key) ... filler  QUESTION ANSWER(key)

The filler cycles the five fixed sentences of the original test ("The grass is green. ..."),
which a model learns to predict almost at once, so the loss that is left to learn is the key.
Its first sentence starts at a random word, as the filler window of an evaluation prompt does
(`evals/haystack.py` cuts a sentence stream mid-way): a key followed by a broken sentence is
then nothing the model has not seen (without it, depth 0 was the weakest row of the heatmap).
`qwenjax.evals` builds its passkey prompts from the same strings (imported from here), so the
evaluation asks exactly the question the training documents ask.

Documents are sized in *estimated* tokens (words, single digits and punctuation runs: what the
Qwen pre-tokenizer splits, so a BPE with whole-word merges gives about this many), because the
corpus exists before the run trains its tokenizer. Lengths are drawn uniformly from a quarter of
`seq_len` up to a little under it: documents fit in one packed row, and the longest contexts the
model sees are about `seq_len` tokens — the "training length" an evaluation extrapolates from.
Document i depends only on (seed, i), so the corpus is random-access and reproducible.
"""

from __future__ import annotations

import re

import numpy as np

from qwenjax.data.corpus import Corpus

FILLER_SENTENCES = (
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
)
PASSKEY_PREFIX = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}."
KEY_DIGITS = 5

# Roughly one token per word, per digit and per punctuation run (the Qwen2/3 split pattern).
_PRETOKEN = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]+")


def estimate_tokens(text: str) -> int:
    """Pre-token count of `text`: a tokenizer-free stand-in for its length in tokens."""
    return len(_PRETOKEN.findall(text))


def random_key(rng: np.random.Generator, digits: int = KEY_DIGITS) -> str:
    """A `digits`-digit decimal key without a leading zero."""
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def filler(start: int, count: int) -> list[str]:
    """`count` filler sentences, cycling the fixed five from position `start`."""
    n = len(FILLER_SENTENCES)
    return [FILLER_SENTENCES[(start + i) % n] for i in range(count)]


def passkey_document(rng: np.random.Generator, target_tokens: int) -> str:
    """One training document of about `target_tokens` estimated tokens, key at a random depth."""
    key = random_key(rng)
    fixed = PASSKEY_PREFIX + PASSKEY_NEEDLE + PASSKEY_QUESTION + PASSKEY_ANSWER
    fixed_tokens = estimate_tokens(fixed.format(key=key))
    per_sentence = np.mean([estimate_tokens(s) for s in FILLER_SENTENCES])
    count = max(0, int((target_tokens - fixed_tokens) / per_sentence))
    sentences = filler(int(rng.integers(len(FILLER_SENTENCES))), count)
    if sentences:  # the filler may start mid-sentence, as an evaluation's filler window does
        words = sentences[0].split()
        sentences[0] = " " + " ".join(words[int(rng.integers(len(words))):])
    depth = int(rng.integers(0, count + 1))  # the needle goes before sentence `depth`
    return "".join(
        [
            PASSKEY_PREFIX,
            *sentences[:depth],
            PASSKEY_NEEDLE.format(key=key),
            *sentences[depth:],
            PASSKEY_QUESTION,
            PASSKEY_ANSWER.format(key=key),
        ]
    )


def passkey_corpus(num_docs: int, seq_len: int, seed: int = 0) -> Corpus:
    """`num_docs` passkey documents of seq_len/4 .. seq_len - 8 estimated tokens."""
    low, high = max(1, seq_len // 4), max(2, seq_len - 8)

    def read(i: int) -> str:
        rng = np.random.default_rng((seed, i))
        return passkey_document(rng, int(rng.integers(low, high + 1)))

    return Corpus(f"passkey:{seq_len}:{seed}", num_docs, read)
