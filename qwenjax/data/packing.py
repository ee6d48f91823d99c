"""Packing documents into fixed-length training rows: the arrays the model consumes.

The token stream: every document is tokenised and followed by `eos_id`; documents are laid end
to end in an order shuffled once per epoch; epochs follow each other forever. Row r is the
window `stream[r*L : r*L + L + 1]` (L = seq_len): its first L tokens are the inputs and its last
L the targets. Consecutive rows overlap by that one extra token, so the inputs of all rows tile
the stream exactly and every token is predicted exactly once — nothing is dropped at a row edge,
and a document longer than what is left of a row simply continues in the next one.

Per row, int32 arrays of length L (T below):
- `input_ids[t]`, `targets[t]` = `input_ids[t+1]` (the last target is the next row's first
  input);
- `positions[t]`: index of `input_ids[t]` within its document, from 0 at a document start and
  continuing (not restarting) where a document carries over from the previous row;
- `segment_ids[t]`: 1, 2, 3 ... for the documents (or pieces of them) in the row, from 1 in
  every row; 0 is reserved for padding. Attention must not cross segments;
- `loss_mask[t]` (float32): 1 where `segment_ids[t] > 0`, 0 on padding. The target of a
  document's last input is its eos (worth learning: where documents end), and the target of the
  eos is the next document's first token — with attention cut at the segment edge that teaches
  how documents begin, Qwen having no BOS token. The stream is infinite, so rows never need
  padding today; the mask is there so the loss is written against one from the start.

`PackedDataset(docs, tokenizer, seq_len, seed=...)` describes the stream; `iter(dataset)` gives a
`PackedIterator` with `next(it)` (one row), `next_batch(B)` (arrays [B, T]) and `get_state()` /
`set_state()`. The state is a few integers — the settings it belongs to, row number and stream
position (epoch, place in that epoch's order, token offset in that document) — so restoring it
re-reads one document and resumes at exactly the next row, bit for bit. `shard(i, n)` keeps rows
r ≡ i (mod n): hosts never overlap and together see the unsharded stream. Every host tokenises
the whole stream to find its rows, which costs n× tokenisation; at ~1 M tokens/s per core
(measured with the Qwen vocabulary) that is ahead of a training step well past a few hosts.

Documents are tokenised when the stream reaches them and kept in a least-recently-used cache of
up to `cache_tokens` tokens (4 bytes each), so the built-in corpus is tokenised once, not once
per epoch, while a large corpus streams.

Why not Grain: `grain.experimental.ConcatThenSplitIterDataset` packs with the same concatenation,
but (grain 0.2.18) restarts positions at 0 in the piece of a document carried into the next
row, packs disjoint windows (so the transition at every row edge is never a target), and its
checkpoint replays buffered rows; row-level sharding would need a further stateful stage.
Working around all four would take more code than the plain iterator below, which has nothing
to replay. The per-epoch order uses `numpy` with seed (seed, epoch) — independent
streams, where Grain's `seed + epoch` makes seed 1's first epoch seed 0's second.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwenjax.data.tokenizer import Tokenizer
from qwenjax.errors import ConfigError

_STATE_VERSION = 1
# A position in the stream: (epoch, index into that epoch's document order, token offset).
Cursor = tuple[int, int, int]


class PackedDataset:
    """The packed token stream of `docs` (see the module docstring). Immutable; `shard` and
    `iter` share its token cache."""

    def __init__(
        self,
        docs: Sequence[str],
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        seed: int = 0,
        cache_tokens: int = 1 << 26,
    ):
        if len(docs) == 0:
            raise ConfigError("data: the corpus has no documents")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"data: seq_len must be a positive integer, got {seq_len!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"data: seed must be a non-negative integer, got {seed!r}")
        self.docs = docs
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.shard_index, self.shard_count = 0, 1
        self._cache_tokens = cache_tokens
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cached = 0  # tokens held in _cache
        self._orders: dict[int, np.ndarray] = {}

    def shard(self, index: int, count: int) -> PackedDataset:
        """The rows r with r % count == index (of this dataset's rows, so shards compose)."""
        if not 0 <= index < count:
            raise ConfigError(f"data: shard index {index} is not in [0, {count})")
        sharded = copy.copy(self)
        sharded.shard_index = self.shard_index + self.shard_count * index
        sharded.shard_count = self.shard_count * count
        return sharded

    def __iter__(self) -> PackedIterator:
        return PackedIterator(self)

    def order(self, epoch: int) -> np.ndarray:
        """Document ids in the order epoch `epoch` reads them."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(len(self.docs))
            # A row spans at most two epochs only on a tiny corpus; two orders always suffice.
            while len(self._orders) > 2:
                del self._orders[min(self._orders)]
        return self._orders[epoch]

    def tokens(self, epoch: int, doc: int) -> np.ndarray:
        """Token ids (int32, eos last) of the `doc`-th document of epoch `epoch`."""
        doc_id = int(self.order(epoch)[doc])
        toks = self._cache.get(doc_id)
        if toks is not None:
            self._cache.move_to_end(doc_id)
            return toks
        ids = self.tokenizer.encode(self.docs[doc_id])
        ids.append(self.tokenizer.eos_id)
        toks = np.asarray(ids, dtype=np.int32)
        self._cache[doc_id] = toks
        self._cached += len(toks)
        # Never evict the document just read: the row being built still needs it.
        while self._cached > self._cache_tokens and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)
        return toks

    def _next_doc(self, epoch: int, doc: int) -> Cursor:
        if doc + 1 < len(self.docs):
            return epoch, doc + 1, 0
        return epoch + 1, 0, 0

    def take(self, cursor: Cursor, n: int, out: dict[str, np.ndarray] | None = None) -> Cursor:
        """Walk `n` tokens of the stream from `cursor` and return where it ends; with `out`,
        also write their ids, positions and segment ids into out[...][:n]."""
        epoch, doc, offset = cursor
        filled, segment = 0, 0
        while filled < n:
            toks = self.tokens(epoch, doc)
            k = min(len(toks) - offset, n - filled)
            if out is not None:
                segment += 1
                out["input_ids"][filled : filled + k] = toks[offset : offset + k]
                out["positions"][filled : filled + k] = np.arange(offset, offset + k)
                out["segment_ids"][filled : filled + k] = segment
            filled += k
            offset += k
            if offset == len(toks):
                epoch, doc, offset = self._next_doc(epoch, doc)
        return epoch, doc, offset

    def row(self, cursor: Cursor) -> tuple[dict[str, np.ndarray], Cursor]:
        """The row whose first input is at `cursor`, and the cursor of the row after it."""
        length = self.seq_len
        out = {k: np.empty(length, np.int32) for k in ("input_ids", "positions", "segment_ids")}
        end = self.take(cursor, length, out)
        epoch, doc, offset = end
        out["targets"] = np.empty(length, np.int32)
        out["targets"][:-1] = out["input_ids"][1:]
        out["targets"][-1] = self.tokens(epoch, doc)[offset]
        out["loss_mask"] = (out["segment_ids"] > 0).astype(np.float32)
        return out, end


class PackedIterator:
    """Rows of a `PackedDataset` (of its shard), endless, with a small checkpointable state."""

    def __init__(self, dataset: PackedDataset):
        self._ds = dataset
        self._row = 0  # number of the next row of the unsharded stream
        self._cursor: Cursor = (0, 0, 0)  # where that row starts

    def __iter__(self) -> PackedIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        while self._row % ds.shard_count != ds.shard_index:
            self._cursor = ds.take(self._cursor, ds.seq_len)
            self._row += 1
        row, self._cursor = ds.row(self._cursor)
        self._row += 1
        return row

    def next_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """The next `batch_size` rows stacked: each array [B, T]."""
        rows = [next(self) for _ in range(batch_size)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        """Everything needed to resume here: JSON-able, a few integers."""
        ds = self._ds
        epoch, doc, offset = self._cursor
        return {
            "version": _STATE_VERSION,
            "seed": ds.seed,
            "seq_len": ds.seq_len,
            "num_docs": len(ds.docs),
            "shard": [ds.shard_index, ds.shard_count],
            "row": self._row,
            "epoch": epoch,
            "doc": doc,
            "offset": offset,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from `get_state()` output, which must come from the same data settings."""
        ds = self._ds
        keys = ("version", "seed", "seq_len", "num_docs", "shard", "row", "epoch", "doc", "offset")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ConfigError(f"data state: missing key {missing[0]!r}")
        ours = self.get_state()
        for key in ("version", "seed", "seq_len", "num_docs", "shard"):
            if list(np.atleast_1d(state[key])) != list(np.atleast_1d(ours[key])):
                raise ConfigError(
                    f"data state: {key} is {state[key]!r} in the saved state but {ours[key]!r} "
                    "here; resuming would not continue the same stream"
                )
        epoch, doc, offset = (int(state[k]) for k in ("epoch", "doc", "offset"))
        if epoch < 0 or not 0 <= doc < len(ds.docs) or not 0 <= offset < len(ds.tokens(epoch, doc)):
            raise ConfigError(
                f"data state: position (epoch {epoch}, doc {doc}, offset {offset}) is not in the "
                "stream; was the tokenizer or corpus changed?"
            )
        self._row = int(state["row"])
        self._cursor = (epoch, doc, offset)
