"""Perplexity by position: does the loss keep falling (or at least hold) deep into the context?

For each length L, `samples` windows of L tokens of the filler text (different random starts in
the essay text; the same cycle for "repeat") are scored with `EvalModel.logprobs`. Target
positions 1 .. L-1 (the position of the predicted token) are split into `buckets` equal ranges
of [0, L); each bucket reports the mean negative log-likelihood (nats) over every window's tokens
in it and its perplexity exp(nll). A model that extrapolates badly shows nll rising in the
buckets past its training length; one that uses long context shows it falling.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from qwenjax.evals.filler import SentenceSource
from qwenjax.evals.haystack import filler_window
from qwenjax.evals.model_api import EvalModel, call_batched
from qwenjax.evals.tasks import sample_rng


def bucket_nll(logprobs: list[np.ndarray], length: int, buckets: int) -> list[dict]:
    """Per equal position range of [0, length): mean nll and perplexity of the targets in it.

    logprobs[i][t] is the log-probability of token t+1 of window i, i.e. of position t+1.
    """
    edges = np.linspace(0, length, buckets + 1).round().astype(int)
    lp = np.stack([np.asarray(x, np.float64) for x in logprobs])  # [N, L-1]
    positions = np.arange(1, lp.shape[1] + 1)
    rows = []
    for lo, hi in itertools.pairwise(edges):
        sel = (positions >= lo) & (positions < hi)
        count = int(sel.sum()) * lp.shape[0]
        nll = float(-lp[:, sel].mean()) if count else float("nan")
        rows.append(
            {
                "start": int(lo),
                "end": int(hi),
                "tokens": count,
                "nll": nll,
                "ppl": math.exp(nll) if count else float("nan"),
            }
        )
    return rows


def run_perplexity(
    model: EvalModel,
    source: SentenceSource,
    lengths: list[int],
    *,
    samples: int,
    buckets: int,
    batch_size: int,
    seed: int,
) -> dict[int, list[dict]]:
    """{length: bucket rows} over `samples` filler windows per length."""
    out = {}
    for length in lengths:
        windows = [
            filler_window(source, length, sample_rng(seed, "perplexity", length, 0, i))[0]
            for i in range(samples)
        ]
        lps = call_batched(model.logprobs, windows, batch_size)
        out[length] = bucket_nll(lps, length, buckets)
    return out
