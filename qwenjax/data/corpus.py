"""Text sources: each a deterministic, ordered, random-access sequence of documents (strings).

Packing shuffles documents by index each epoch, so a source must be a `Sequence[str]` (length
known up front, any document readable by index) rather than a stream. Sources hold only file
names (and line offsets for JSONL) and read a document when it is asked for, so a corpus larger
than memory costs only its index.

- `stdlib_corpus`: the Python standard library's own `.py` files (CPython 3.11: ~800 files,
  ~13 MB), the built-in dataset that exists offline on every machine, so examples need no download.
- `text_files`: files or globs (local or gs://), one document per file.
- `jsonl_files`: JSONL files, one document per line, taken from one string field.
- `concat`: several sources one after another.
- `qwenjax.data.passkey.passkey_corpus`: synthetic passkey-retrieval documents (its own module).

Bad input (a glob matching nothing, a JSONL line without the field) raises `ConfigError` naming
the file, line and field.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qwenjax.errors import ConfigError
from qwenjax.paths import as_path, glob_files


class Corpus(Sequence[str]):
    """Documents read lazily by index: `size` documents, document i is `read(i)`."""

    def __init__(self, name: str, size: int, read: Callable[[int], str]):
        self.name = name
        self._size = size
        self._read = read

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not -self._size <= index < self._size:
            raise IndexError(f"{self.name}: document {index} of {self._size}")
        return self._read(index % self._size)

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, {self._size} documents)"


def stdlib_corpus(max_docs: int | None = None) -> Corpus:
    """The standard library's `.py` files sorted by path relative to the stdlib root, without
    `site-packages`, `test`/`tests` directories and files that are not valid UTF-8.

    Files are decoded once here so that the document count is fixed before training starts;
    a file that cannot be read or decoded is left out rather than failing mid-run.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests"}
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning here keeps the walk out of site-packages, which can dwarf the stdlib itself.
        dirnames[:] = [d for d in dirnames if d not in skip]
        rel = Path(dirpath).relative_to(root)
        candidates += [
            ((rel / f).as_posix(), root / rel / f) for f in filenames if f.endswith(".py")
        ]
    candidates.sort()
    paths: list[Path] = []
    for _, path in candidates:
        if max_docs is not None and len(paths) >= max_docs:
            break
        try:
            path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        paths.append(path)
    return Corpus(f"stdlib:{root}", len(paths), lambda i: paths[i].read_text("utf-8"))


def _expand(patterns: list[str] | str, what: str) -> list[Path]:
    """Files matched by each glob (recursive `**` allowed), sorted and without duplicates."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ConfigError(f"{what}: no file patterns given")
    found: set[Path] = set()
    for pattern in patterns:
        matched = glob_files(pattern)
        if not matched:
            raise ConfigError(f"{what}: {pattern!r} matches no files")
        found.update(matched)
    return sorted(found)


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None


def text_files(patterns: list[str] | str) -> Corpus:
    """Text files (local or gs://), one document per file, sorted by path. Each pattern is a path or glob
    and must match at least one file."""
    paths = _expand(patterns, "text_files")
    return Corpus(f"text_files:{patterns}", len(paths), lambda i: _read_utf8(paths[i]))


def _line_offsets(path: Path) -> np.ndarray:
    """Byte offsets of the non-blank lines of a file: the index that makes lines random-access."""
    offsets = []
    pos = 0
    with as_path(path).open("rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


def _jsonl_doc(path: Path, offset: int, field: str) -> str:
    with as_path(path).open("rb") as f:
        f.seek(offset)
        raw = f.readline()

    # The line number is only needed for the message, so it is counted only on error.
    def where() -> str:
        with as_path(path).open("rb") as f:
            line = f.read(offset).count(b"\n") + 1
        return f"{path}:{line}"

    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where()}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or field not in record:
        raise ConfigError(f"{where()}: no field {field!r} in this JSONL record")
    text = record[field]
    if not isinstance(text, str):
        raise ConfigError(f"{where()}: field {field!r} is {type(text).__name__}, not a string")
    return text


def jsonl_files(patterns: list[str] | str, field: str = "text") -> Corpus:
    """JSONL files (sorted by path), one document per non-blank line: the string in `field`.

    Files are indexed (line offsets) here; a record is parsed when it is read. The first record
    of every file is checked now, so a wrong field name fails before training starts.
    """
    index: list[tuple[Path, int]] = []
    for path in _expand(patterns, "jsonl_files"):
        offsets = _line_offsets(path)
        if len(offsets) == 0:
            raise ConfigError(f"{path}: JSONL file has no records")
        _jsonl_doc(path, int(offsets[0]), field)
        index.extend((path, int(o)) for o in offsets)
    return Corpus(
        f"jsonl_files:{patterns}[{field}]", len(index), lambda i: _jsonl_doc(*index[i], field)
    )


def concat(*sources: Sequence[str]) -> Corpus:
    """Several sources as one, in the order given."""
    starts = np.cumsum([0] + [len(s) for s in sources])

    def read(i: int) -> str:
        k = int(np.searchsorted(starts, i, side="right")) - 1
        return sources[k][i - int(starts[k])]

    return Corpus("concat", int(starts[-1]), read)
