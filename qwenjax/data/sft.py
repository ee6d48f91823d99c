"""Packed rows of supervised fine-tuning examples (qwenjax.data.chat), the arrays the train step
consumes: the same fields as `qwenjax.data.packing` (input_ids, targets, positions, segment_ids,
loss_mask, each [B, T]), so the model's segment handling — attention stopped at a segment edge,
Gated DeltaNet state and conv window restarted — separates conversations exactly as it does
pre-training documents.

Unlike pre-training documents, an example is never split over rows: each epoch the examples are
shuffled (numpy, seed (seed, epoch)) and laid into rows greedily, whole, one segment each; what
is left of a row is padding (segment 0, no loss). An example of n tokens takes n slots: inputs
ids[0..n-1], targets ids[1..n-1] then nothing (masked), `loss_mask[t] = mask[t + 1]`. An example
longer than T is cut to its first T tokens (`overlong: truncate`) or left out (`drop`), decided
once when the files are read and counted in `stats` (written with every metrics line).

All files are read and tokenised up front: every malformed line is reported (file:line) before
training starts, and the counts are known. SFT sets are small next to pre-training corpora
(100K conversations of 1K tokens tokenise in ~3 minutes on one core).

State: (epoch, next example of that epoch) — resuming rebuilds the same rows. With several
hosts every host builds the whole batch and keeps its contiguous block of rows.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from qwenjax.data.chat import encode_record
from qwenjax.data.corpus import _expand
from qwenjax.errors import ConfigError
from qwenjax.paths import as_path

_STATE_VERSION = 1


def read_sft_files(patterns, tokenizer, *, loss_on: str = "assistant", template: str | None = None
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every record of the JSONL files, encoded; a bad line raises ConfigError naming file:line."""
    examples = []
    for path in _expand(patterns, "sft data"):
        with as_path(path).open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    examples.append(encode_record(tokenizer, record, loss_on=loss_on,
                                                  template=template))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ConfigError(f"{path}:{number}: not valid JSON ({e})") from None
                except ConfigError as e:
                    raise ConfigError(f"{path}:{number}: {e}") from None
    if not examples:
        raise ConfigError(f"sft data {patterns!r}: no records")
    return examples


class SFTDataset:
    """Whole examples packed into rows of `seq_len` (see the module docstring)."""

    def __init__(self, examples, seq_len: int, *, seed: int = 0, batch_size: int = 1,
                 overlong: str = "truncate", pad_id: int = 0):
        if overlong not in ("truncate", "drop"):
            raise ConfigError(f"data.overlong {overlong!r} is not one of truncate, drop")
        kept, truncated, dropped = [], 0, 0
        for ids, mask in examples:
            if len(ids) > seq_len:
                if overlong == "drop":
                    dropped += 1
                    continue
                ids, mask, truncated = ids[:seq_len], mask[:seq_len], truncated + 1
            if mask[1:].any():  # the first token is never a target
                kept.append((ids, mask))
            else:
                dropped += 1  # nothing left to learn from (e.g. cut before the answer)
        if not kept:
            raise ConfigError(f"sft data: no example fits in data.seq_len={seq_len} with a target")
        self.examples, self.seq_len, self.seed = kept, seq_len, seed
        self.batch_size, self.pad_id = batch_size, pad_id
        self.shard_index, self.shard_count = 0, 1
        self.stats = {"sft_examples": len(kept), "sft_truncated": truncated,
                      "sft_dropped": dropped}

    def shard(self, index: int, count: int) -> SFTDataset:
        if self.batch_size % count:
            raise ConfigError(f"data: batch {self.batch_size} is not divisible by {count} hosts")
        import copy

        out = copy.copy(self)
        out.shard_index, out.shard_count = index, count
        return out

    def __iter__(self) -> SFTIterator:
        return SFTIterator(self)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))


class SFTIterator:
    def __init__(self, ds: SFTDataset):
        self._ds = ds
        self._cursor = (0, 0)  # (epoch, next example in that epoch's order)
        self._order = (0, ds.order(0))

    @property
    def stats(self) -> dict[str, int]:
        return self._ds.stats

    def _example(self, epoch: int, k: int):
        if self._order[0] != epoch:
            self._order = (epoch, self._ds.order(epoch))
        return self._ds.examples[int(self._order[1][k])]

    def _row(self, cursor):
        ds, T = self._ds, self._ds.seq_len
        out = {k: np.zeros(T, np.int32) for k in ("input_ids", "targets", "positions",
                                                   "segment_ids")}
        out["input_ids"][:] = ds.pad_id
        out["targets"][:] = ds.pad_id
        out["loss_mask"] = np.zeros(T, np.float32)
        epoch, k = cursor
        filled, segment = 0, 0
        while True:
            ids, mask = self._example(epoch, k)
            n = len(ids)
            if filled + n > T:
                break
            segment += 1
            sl = slice(filled, filled + n)
            out["input_ids"][sl] = ids
            out["targets"][filled:filled + n - 1] = ids[1:]
            out["loss_mask"][filled:filled + n - 1] = mask[1:]
            out["positions"][sl] = np.arange(n)
            out["segment_ids"][sl] = segment
            filled += n
            k += 1
            if k == len(ds.examples):
                epoch, k = epoch + 1, 0
        return out, (epoch, k)

    def next_batch(self, batch_size: int | None = None) -> dict[str, np.ndarray]:
        ds = self._ds
        per = ds.batch_size // ds.shard_count
        if batch_size is not None and batch_size != per:
            raise ConfigError(f"data: asked for {batch_size} rows, this host's batch is {per}")
        rows, cursor = [], self._cursor
        for _ in range(ds.batch_size):
            row, cursor = self._row(cursor)
            rows.append(row)
        self._cursor = cursor
        mine = rows[ds.shard_index * per:(ds.shard_index + 1) * per]
        return {k: np.stack([r[k] for r in mine]) for k in mine[0]}

    __next__ = next_batch

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, Any]:
        ds = self._ds
        return {"version": _STATE_VERSION, "kind": "sft", "seed": ds.seed, "seq_len": ds.seq_len,
                "num_examples": len(ds.examples), "cursor": list(self._cursor)}

    def set_state(self, state: dict[str, Any]) -> None:
        ours = self.get_state()
        for key in ("version", "kind", "seed", "seq_len", "num_examples"):
            if state.get(key) != ours[key]:
                raise ConfigError(
                    f"data state: {key} is {state.get(key)!r} in the saved state but "
                    f"{ours[key]!r} here; resuming would not continue the same stream")
        epoch, k = (int(x) for x in state["cursor"])
        self._cursor = (epoch, k)
