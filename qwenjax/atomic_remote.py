"""`qwenjax.atomic.output_dir` on object storage (`gs://...`), where no directory rename exists.

The writer fills a local temporary directory (every writer keeps writing local files); then:
  1. a pending marker `.qwenjax-output.pending.json` is written, naming the kind and every file
     the target will hold of ours (the previous output's and the new one's): from now on the
     target reads as incomplete (`check_complete`), and a later run of the same command knows
     exactly which files it may delete;
  2. the previous output's marker goes, the new files are uploaded, files the previous output
     listed and the new one does not are deleted;
  3. the marker `.qwenjax-output.json` is written last, then the pending marker removed.
A kill anywhere leaves either the old output, or a target that `check_complete` refuses and the
same command replaces. The rules of what may be replaced are `atomic`'s: a previous output of
the same kind (its listed files only; user files stay where they are, one with a new file's name
is refused unless overwrite), an empty prefix, or anything else only with overwrite. A failed
writer uploads nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qwenjax.errors import OutputError

PENDING = ".qwenjax-output.pending.json"
_FLAG = "pass --overwrite (overwrite=True in Python) to replace it"


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "r") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def _listing(fs, root: str) -> list[str]:
    """Every object under `root`, relative to it."""
    return sorted(f[len(root):].lstrip("/") for f in fs.find(root))


def check_complete(directory: str) -> None:
    """Raise OutputError if `directory` is a qwenjax output whose writer did not finish."""
    from qwenjax.atomic import read_marker

    fs, root = _fs(directory)
    if fs.exists(f"{root}/{PENDING}") and read_marker(directory) is None:
        raise OutputError(
            f"{directory} is an incomplete qwenjax output (its writer stopped before the "
            "completion marker); write it again"
        )


def _inspect(url: str, kind: str, overwrite: bool, inputs) -> tuple[str | dict, list[str]]:
    """-> (state, current files): state "new" | "foreign" | {"files": [ours...]} of a previous
    (possibly incomplete) output of this kind."""
    from qwenjax.atomic import MARKER, read_marker

    target = url.rstrip("/")
    for src in inputs:
        src = os.fspath(src).rstrip("/")
        if target == src or target.startswith(src + "/"):
            raise OutputError(f"output {url} is inside its own input {src}; choose another path")
        if src.startswith(target + "/"):
            raise OutputError(f"output {url} contains its input {src}; choose another path")
    fs, root = _fs(target)
    bucket = root.split("/", 1)[0]
    try:
        if not fs.exists(bucket):
            raise OutputError(f"output {url} cannot be created: bucket {bucket} does not exist")
        if fs.isfile(root):
            if not overwrite:
                raise OutputError(f"output {url} exists and is not a directory; {_FLAG}")
            return "foreign", []
        current = _listing(fs, root) if fs.isdir(root) else []
    except OSError as e:
        raise OutputError(f"output {url} cannot be read ({e})") from None
    if not current:
        return "new", []
    marker = read_marker(target)
    pending = _read_json(fs, f"{root}/{PENDING}")
    ours = marker if marker is not None else pending
    if ours is not None and ours["kind"] == kind and isinstance(ours.get("files"), list):
        listed = set(ours["files"]) | (set(pending["files"]) if pending else set())
        return {"files": sorted(listed | {MARKER, PENDING})}, current
    if not overwrite:
        what = f"a qwenjax {ours['kind']!r} output" if ours else "not a qwenjax output"
        raise OutputError(f"output {url} is not empty and is {what} (expected {kind!r}); {_FLAG}")
    return "foreign", current


def check_output(target: str, kind: str, *, overwrite: bool = False,
                 inputs: Iterable[os.PathLike | str] = ()) -> None:
    _inspect(os.fspath(target), kind, overwrite, list(inputs))


@contextmanager
def output_dir(target: str, kind: str, *, overwrite: bool = False,
               inputs: Iterable[os.PathLike | str] = ()) -> Iterator[Path]:
    from qwenjax.atomic import MARKER, _files, _write_marker

    url, inputs = os.fspath(target).rstrip("/"), list(inputs)
    _inspect(url, kind, overwrite, inputs)
    with tempfile.TemporaryDirectory(prefix="qwenjax-output-") as tmp:
        tmp = Path(tmp)
        yield tmp
        (tmp / MARKER).unlink(missing_ok=True)  # only this module writes the marker
        files = _files(tmp)
        state, current = _inspect(url, kind, overwrite, inputs)
        fs, root = _fs(url)
        ours = set(state["files"]) if isinstance(state, dict) else set()
        if isinstance(state, dict):
            clashes = [f for f in current if f not in ours and f in set(files)]
            if clashes and not overwrite:
                raise OutputError(
                    f"output {url}: {clashes[0]} was not written by qwenjax and the new output "
                    f"has a file of that name; move it away or {_FLAG}"
                )
        elif state == "foreign":  # overwrite=True: the user asked for the old entry to go
            fs.rm(root, recursive=True)
        pending = {"kind": kind, "files": sorted((ours - {MARKER, PENDING}) | set(files))}
        with fs.open(f"{root}/{PENDING}", "w") as f:
            f.write(json.dumps(pending, indent=1) + "\n")
        if MARKER in current:
            fs.rm(f"{root}/{MARKER}")
        for name in files:
            fs.put_file(str(tmp / name), f"{root}/{name}")
        for name in sorted(ours - set(files) - {MARKER, PENDING}):
            if name in current:
                fs.rm(f"{root}/{name}")
        _write_marker(tmp, kind, files)
        fs.put_file(str(tmp / MARKER), f"{root}/{MARKER}")
        fs.rm(f"{root}/{PENDING}")
