"""RULER-style aggregation tasks (Hsieh et al., 2024): variable tracking and common-word extraction.

- variable_tracking: chains `VAR A = 12345`, `VAR B = VAR A`, ... (`hops` links each) hidden in
  the filler, two chains (one asked for, one distractor) interleaved with their statements in
  order at random depths; the model must list every variable that holds the asked value.
- common_words: a numbered list of words in which 10 words occur often and the rest rarely
  (RULER: 30 and 3 times; fewer at short lengths so the list fits); the model must name the 10.
  The list is the whole haystack; the tokens it leaves of `length` are newlines after the
  instruction, so the prompt is still exactly `length` tokens.

Both score the fraction of the expected names present in the output. They have no depth axis.
"""

from __future__ import annotations

import itertools
import string

import numpy as np

from qwenjax.data.passkey import random_key
from qwenjax.errors import ConfigError
from qwenjax.evals import haystack
from qwenjax.evals.tasks import Sample, TaskContext

VT_PREFIX = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = (
    " Question: Find all variables that are assigned the value {value} in the text above."
    " Answer: According to the chain(s) of variable assignment in the text above, {n} variables"
    " are assigned the value {value}, they are:"
)
VT_CHAINS, VT_HOPS = 2, 4

CWE_PREFIX = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = (
    "\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words "
    "that appear most often in the list are:"
)
CWE_COMMON = 10


def _var_names(rng: np.random.Generator, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(list(string.ascii_uppercase), 5)))
    # Sorted first: set order varies between processes (string hashing is salted).
    return [sorted(names)[i] for i in rng.permutation(len(names))]


def variable_tracking(
    ctx: TaskContext, length: int, depth: float | None, rng: np.random.Generator
) -> Sample:
    names = _var_names(rng, VT_CHAINS * (VT_HOPS + 1))
    chains = [names[c * (VT_HOPS + 1) : (c + 1) * (VT_HOPS + 1)] for c in range(VT_CHAINS)]
    values = [random_key(rng) for _ in chains]
    needles = []
    for chain, value in zip(chains, values):
        # Sorted depths keep each chain's statements in assignment order.
        depths = np.sort(rng.random(len(chain)))
        for i, (name, d) in enumerate(zip(chain, depths)):
            rhs = value if i == 0 else f"VAR {chain[i - 1]}"
            needles.append(haystack.Needle(ctx.encode(f" VAR {name} = {rhs}."), float(d)))
    question = VT_QUESTION.format(value=values[0], n=VT_HOPS + 1)
    hay = haystack.build(
        length,
        ctx.encode(VT_PREFIX),
        ctx.encode(question),
        needles,
        ctx.sentences,
        rng,
        what="variable_tracking",
    )
    # A name of 5 capitals is at most 5 tokens, plus a separator.
    return Sample(
        "variable_tracking",
        length,
        None,
        hay.tokens,
        chains[0],
        7 * (VT_HOPS + 1),
        {"value": values[0], "depths": hay.depths[: VT_HOPS + 1]},
    )


def common_words(
    ctx: TaskContext, length: int, depth: float | None, rng: np.random.Generator
) -> Sample:
    prefix, question = ctx.encode(CWE_PREFIX), ctx.encode(CWE_QUESTION)
    budget = length - len(prefix) - len(question)
    pool = ctx.words
    order = rng.permutation(len(pool))
    common = [pool[i] for i in order[:CWE_COMMON]]
    # Rare words: the rest of the pool, then (for lists longer than it) two-word compounds.
    singles = set(pool)
    rare_pool = itertools.chain(
        (pool[i] for i in order[CWE_COMMON:]),
        (
            c
            for a in order[CWE_COMMON:]
            for b in order[CWE_COMMON:]
            if (c := pool[a] + pool[b]) not in singles
        ),
    )
    word_tokens = {w: len(ctx.encode(f" {w}")) for w in common}
    per_entry = 2 + np.mean(list(word_tokens.values())) + 1  # " N." + " word"
    # RULER's 30 / 3 repetitions where they fit in half the list, fewer (>= 2 / 1) when not.
    f_common = int(np.clip(budget / per_entry / (2 * CWE_COMMON), 2, 30))
    f_rare = 3 if f_common > 6 else 1
    words = [w for w in common for _ in range(f_common)]

    def entry(i: int, w: str) -> int:  # tokens of " {i+1}. {w}"
        if w not in word_tokens:
            word_tokens[w] = len(ctx.encode(f" {w}"))
        return len(ctx.encode(f" {i + 1}.")) + word_tokens[w]

    total = sum(entry(i, w) for i, w in enumerate(words))
    if total > budget:
        raise ConfigError(f"eval.lengths: {length} tokens is too short for common_words")
    for w in rare_pool:  # add rare words while they fit
        extra = sum(entry(len(words) + k, w) for k in range(f_rare))
        if total + extra > budget:
            break
        words += [w] * f_rare
        total += extra
    words = [words[i] for i in rng.permutation(len(words))]
    entries = [
        t for i, w in enumerate(words) for t in ctx.encode(f" {i + 1}.") + ctx.encode(f" {w}")
    ]
    newline = ctx.encode("\n")
    pad = (newline * (budget - len(entries)))[: budget - len(entries)]
    tokens = prefix + pad + entries + question
    assert len(tokens) == length
    return Sample(
        "common_words",
        length,
        None,
        tokens,
        common,
        4 * CWE_COMMON + 8,
        {"common_repeats": f_common, "rare_repeats": f_rare, "list_words": len(words)},
    )
