"""Activations of a site over a token budget: captured batch by batch from the packed data
stream, kept in memory (small runs) or streamed into an on-disk store.

The store (`store="disk"`) is a directory of `.npy` shards, each written whole to a temporary
name and renamed, plus `manifest.json` (rewritten the same way after every shard) listing the
shards, the dtype and the data stream's state after the last one. Host memory stays bounded by
one shard; a killed capture resumes after its last complete shard, reading the same tokens
(the stream state is the packing iterator's). Training reads the store through `StoreRows`:
memory-mapped shards, random rows gathered per batch (a global shuffle, no buffer needed).

N rows (tokens), D the site's width, R sequences, T their length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from qwenjax.interp.capture import capture_fn

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
STORED = {"float32": np.float32, "bfloat16": np.uint16}
SHARD_ROWS = 1 << 16


def capture_batches(model, key, stream, rows: int, *, whole: bool = False
                    ) -> Iterator[tuple[dict, np.ndarray]]:
    """(token batch, activations [B*T, D] float32) from the packed `stream` until `rows` rows;
    the last batch is cut to fit unless `whole` (then the rows end where the stream stands)."""
    run = capture_fn(model, [key])
    done = 0
    while done < rows:
        batch = stream.next_batch()
        acts = run(batch["input_ids"], batch["positions"], batch["segment_ids"])[key]
        acts = np.asarray(acts, np.float32).reshape(-1, acts.shape[-1])
        take = len(acts) if whole else min(len(acts), rows - done)
        done += take
        yield batch, acts[:take]


def collect(model, key, stream, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """In memory: (activations [rows, D] float32, the token ids [R, T] they came from)."""
    acts, ids = [], []
    for batch, a in capture_batches(model, key, stream, rows):
        acts.append(a)
        ids.append(batch["input_ids"])
    return np.concatenate(acts), np.concatenate(ids)


class DiskStore:
    """Append-only activation shards with a manifest; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, dtype: str = "float32"):
        self.dir = Path(directory)
        self.dtype = dtype
        self.manifest = {"dtype": dtype, "shards": [], "rows": 0, "stream_state": None,
                         "complete": False}
        path = self.dir / "manifest.json"
        if path.exists():
            self.manifest = json.loads(path.read_text())
            if self.manifest["dtype"] != dtype:
                raise ValueError(f"{self.dir} holds {self.manifest['dtype']} activations, "
                                 f"not {dtype}")

    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    def append(self, acts: np.ndarray, stream_state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"shard-{len(self.manifest['shards']):05d}.npy"
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            # bfloat16 is stored as its uint16 bits: .npy has no bfloat16 type.
            np.save(f, acts.astype(DTYPES[self.dtype]).view(STORED[self.dtype]))
        os.replace(tmp, self.dir / name)
        self.manifest["shards"].append({"file": name, "rows": len(acts)})
        self.manifest["rows"] += len(acts)
        self.manifest["stream_state"] = stream_state
        self._write_manifest()

    def finish(self) -> None:
        self.manifest["complete"] = True
        self._write_manifest()

    def _write_manifest(self) -> None:
        tmp = self.dir / ".manifest.json.tmp"
        tmp.write_text(json.dumps(self.manifest))
        os.replace(tmp, self.dir / "manifest.json")


def fill_store(store: DiskStore, model, key, stream, rows: int, shard_rows: int = SHARD_ROWS):
    """Capture until the store holds at least `rows` rows (whole batches, so the saved stream
    state is exactly where its rows end), resuming after its last complete shard."""
    if store.manifest["complete"] and store.rows >= rows:
        return store
    if store.manifest["stream_state"] is not None:
        stream.set_state(store.manifest["stream_state"])
    pending, n = [], 0
    for _, acts in capture_batches(model, key, stream, rows - store.rows, whole=True):
        pending.append(acts)
        n += len(acts)
        if n >= shard_rows:
            # A shard ends at a batch edge, so the stream state is exactly where it stopped.
            store.append(np.concatenate(pending), stream.get_state())
            pending, n = [], 0
    if pending:
        store.append(np.concatenate(pending), stream.get_state())
    store.finish()
    return store


class StoreRows:
    """Rows of a DiskStore, indexable by a sorted index array (as `ShuffledRows` asks)."""

    def __init__(self, store: DiskStore):
        self.shards = [np.load(store.dir / s["file"], mmap_mode="r")
                       for s in store.manifest["shards"]]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.dtype = DTYPES[store.dtype]
        self.shape = (int(self.starts[-1]), self.shards[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.ndim == 0 or isinstance(idx.flat[0], (slice,)):
            raise TypeError("StoreRows takes an index array")
        which = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((len(idx), self.shape[1]), np.float32)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s][idx[sel] - self.starts[s]].view(self.dtype)
        return out
