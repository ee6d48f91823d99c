"""The one way qwenjax writes an output directory: `with output_dir(target, kind) as tmp: ...`.

Every writer (import-hf's parameter checkpoint, export-hf / `save_pretrained`, eval reports, and
the plan / SAE / adapter outputs to come) goes through `output_dir`, so these rules hold for all:

- The writer fills a fresh temporary sibling `.NAME.tmp-*`; the target changes only once that is
  complete, by rename. If the writer or the rename fails, the temporary directory (and any parent
  directory this call created) is removed and the target is as it was.
- A marker `.qwenjax-output.json` is written last into every output: its kind (`"hf-model"`,
  `"params"`, `"eval-report"`, ...) and the files the writer wrote. It decides whether a target
  is "a previous output of the same kind", and is the completion marker where there is no
  directory rename (object storage: written last, read first).
- What happens to the target:
    missing, or an empty directory      written
    a previous output of the same kind  replaced: the files its marker lists are removed; every
                                        other file in it (added by the user, e.g. tokenizer files
                                        beside an export) is moved into the new output. A user
                                        file with the name of a new file is refused (overwrite:
                                        the new file wins)
    anything else: a non-empty directory of another kind or not ours, a regular file
                                        refused (OutputError) unless `overwrite`, which replaces
                                        it whole
    equal to, inside, or around one of the writer's inputs
                                        refused, overwrite or not
  All of this is checked when the `with` block is entered (before any work) and again just before
  the rename (the target may have changed meanwhile). `check_output` runs the same checks alone,
  for commands that must refuse before hours of work (the training run's export).
- Files and directories get the process umask's permissions (no 0700 / 0600 temporaries).
- A `gs://` target (no directory rename there) follows the same rules with the marker as the
  completion marker: `qwenjax.atomic_remote`.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qwenjax import atomic_remote
from qwenjax.errors import OutputError
from qwenjax.paths import as_path, is_url

MARKER = ".qwenjax-output.json"
_FLAG = "pass --overwrite (overwrite=True in Python) to replace it"


def read_marker(directory: str | os.PathLike) -> dict | None:
    """The marker of a qwenjax output directory ({"kind", "files", ...}), or None."""
    try:
        marker = json.loads((as_path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and isinstance(marker.get("kind"), str)
    if not ok or not isinstance(marker.get("files"), list):
        return None
    # The list decides what a replacement deletes: only plain relative paths inside the output
    # count (an edited marker naming "../x" or "/x" must not reach outside it).
    if not all(_inside_name(f) for f in marker["files"]):
        return None
    return marker


def _inside_name(f) -> bool:
    if not isinstance(f, str) or not f or f.startswith("/") or "\\" in f:
        return False
    parts = f.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def check_output(
    target: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> None:
    """Raise OutputError if `output_dir(target, kind, ...)` would refuse; writes nothing."""
    if is_url(target):
        atomic_remote.check_output(target, kind, overwrite=overwrite, inputs=inputs)
        return
    _inspect(_real(target), Path(target), kind, overwrite, inputs)


@contextmanager
def output_dir(
    target: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield an empty temporary directory to write the output into; on success it becomes
    `target` (rules in the module docstring). `inputs`: paths the writer reads from, which the
    output may not be, lie in, or contain."""
    if is_url(target):
        with atomic_remote.output_dir(target, kind, overwrite=overwrite, inputs=inputs) as tmp:
            yield tmp
        return
    shown, real, inputs = Path(target), _real(target), list(inputs)
    _inspect(real, shown, kind, overwrite, inputs)
    created = _make_parents(real.parent, shown)
    tmp = _fresh_sibling(real, "tmp", shown, created)
    try:
        yield tmp
        (tmp / MARKER).unlink(missing_ok=True)  # only this module writes the marker
        files = _files(tmp)
        _write_marker(tmp, kind, files)
        state = _inspect(real, shown, kind, overwrite, inputs)
        _commit(tmp, real, shown, state, set(files), overwrite)
    except BaseException:
        if _holds_user_files(tmp):
            rescued = tmp.with_name(tmp.name.replace(".tmp-", ".rescued-", 1))
            os.rename(tmp, rescued)  # never delete what we did not write
            print(f"qwenjax: warning: your files from {shown} are kept in {rescued}",
                  file=sys.stderr)  # fmt: skip
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):  # parents this call made, innermost first, if still empty
            try:
                d.rmdir()
            except OSError:
                break
        raise


# ---- checks ---------------------------------------------------------------------------------


def _real(path: str | os.PathLike) -> Path:
    # Symlinks resolved: a link to a directory is written where it points (same file system as
    # the temporary sibling), and "inside its input" compares real places.
    return Path(os.path.realpath(os.path.abspath(path)))


def _inspect(real: Path, shown: Path, kind: str, overwrite: bool, inputs) -> str | dict:
    """-> "new" | "empty" | "foreign" (replaced whole, overwrite given) | the marker of a
    previous output of this kind."""
    for src in inputs:
        if is_url(src):  # a local output cannot be inside a bucket
            continue
        src_real = _real(src)
        if real == src_real or src_real in real.parents:
            raise OutputError(f"output {shown} is inside its own input {src}; choose another path")
        if real in src_real.parents:
            raise OutputError(f"output {shown} contains its input {src}; choose another path")
    if not os.path.lexists(real):
        _check_parent(real.parent, shown)
        return "new"
    if not real.is_dir():
        if not overwrite:
            raise OutputError(f"output {shown} exists and is not a directory; {_FLAG}")
        _check_parent(real.parent, shown)
        return "foreign"
    _check_parent(real.parent, shown)
    try:
        empty = not any(os.scandir(real))
    except OSError as e:
        raise OutputError(f"output {shown} cannot be read ({e.strerror})") from None
    if empty:
        return "empty"
    marker = read_marker(real)
    if marker is not None and marker["kind"] == kind:
        return marker
    if not overwrite:
        what = f"a qwenjax {marker['kind']!r} output" if marker else "not a qwenjax output"
        raise OutputError(f"output {shown} is not empty and is {what} (expected {kind!r}); {_FLAG}")
    return "foreign"


def _check_parent(parent: Path, shown: Path) -> None:
    """The nearest existing ancestor must be a writable directory."""
    existing = parent
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"output {shown} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output {shown} cannot be created: {existing} is not writable")


# ---- writing --------------------------------------------------------------------------------


def _make_parents(parent: Path, shown: Path) -> list[Path]:
    missing = []
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    created = []
    for d in reversed(missing):  # outermost first
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"output {shown} cannot be created: {d}: {e.strerror}") from None
        created.append(d)
    return created


def _fresh_sibling(real: Path, what: str, shown: Path, created: list[Path]) -> Path:
    """A new empty directory beside `real` (umask permissions, unlike tempfile.mkdtemp)."""
    for _ in range(100):
        path = real.with_name(f".{real.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            for d in reversed(created):  # only the parents this call made, only if empty
                try:
                    d.rmdir()
                except OSError:
                    break
            raise OutputError(f"output {shown} cannot be written: {e.strerror}") from None
    raise OutputError(f"output {shown}: no free temporary name beside it")


def _files(root: Path) -> list[str]:
    """Every file (and symlink) under `root`, as sorted POSIX paths relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out += [(rel / n).as_posix() for n in filenames]
        out += [(rel / n).as_posix() for n in dirnames if (Path(dirpath) / n).is_symlink()]
    return sorted(out)


def _write_marker(tmp: Path, kind: str, files: list[str]) -> None:
    marker = {
        "kind": kind,
        "files": files,
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "qwenjax_output": 1,
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _clashes(user: list[str], new: set[str]) -> list[str]:
    """User files whose path is a new file's, or a directory of one, or lies under one."""
    new_dirs = {p.as_posix() for f in new for p in Path(f).parents}
    return [
        f
        for f in user
        if f in new or f in new_dirs or any(p.as_posix() in new for p in Path(f).parents)
    ]


def _commit(tmp: Path, real: Path, shown: Path, state, new: set[str], overwrite: bool) -> None:
    if state in ("new", "empty"):
        try:
            os.rename(tmp, real)  # onto an empty directory, rename replaces it
        except OSError as e:
            raise OutputError(f"output {shown} cannot be written: {e.strerror}") from None
        return
    if state == "foreign":  # overwrite=True: the user asked for the old entry to go
        _swap(tmp, real, shown)
        return
    ours = set(state["files"]) | {MARKER}
    user = [f for f in _files(real) if f not in ours]
    clashes = _clashes(user, new)
    if clashes and not overwrite:
        raise OutputError(
            f"output {shown}: {clashes[0]} was not written by qwenjax and the new output has a "
            f"file of that name; move it away or {_FLAG}"
        )
    keep = [f for f in user if f not in clashes]
    moved = []
    try:
        for f in keep:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            os.rename(real / f, tmp / f)
            moved.append(f)
        old = _swap(tmp, real, shown, delete_old=False)
    except BaseException:
        stuck = []
        for f in moved:  # give the user's files back before the temporary directory goes
            try:
                os.rename(tmp / f, real / f)
            except OSError:
                stuck.append(f)
        if stuck:  # output_dir keeps tmp (renamed .rescued-*) rather than deleting it
            (tmp / _USER_FILES).write_text(json.dumps(stuck) + "\n")
        raise
    _remove_listed(old, ours | set(clashes))


_USER_FILES = ".qwenjax-user-files.json"  # in a temporary directory: user files it still holds


def _holds_user_files(tmp: Path) -> bool:
    return (tmp / _USER_FILES).exists()


def _swap(tmp: Path, real: Path, shown: Path, *, delete_old: bool = True) -> Path:
    """Move `real` aside, `tmp` into its place; -> where the old entry went."""
    old = real.with_name(f".{real.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(real, old)
    except OSError as e:
        raise OutputError(f"output {shown} cannot be replaced: {e.strerror}") from None
    try:
        os.rename(tmp, real)
    except OSError as e:
        try:
            os.rename(old, real)
        except OSError:
            raise OutputError(
                f"output {shown} cannot be written ({e.strerror}) and the previous one could not "
                f"be put back: it is in {old}"
            ) from None
        raise OutputError(f"output {shown} cannot be written: {e.strerror}") from None
    if delete_old:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    return old


def _remove_listed(old: Path, listed: set[str]) -> None:
    """Delete the files a previous output wrote, then its emptied directories. Anything else
    (only there if added while we wrote) is left where it is, and said so."""
    for f in listed:
        path = old / f
        if path.is_symlink() or path.is_file():
            path.unlink()
    for dirpath, _, _ in sorted(os.walk(old), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass
    if old.exists():
        print(f"qwenjax: warning: files not written by qwenjax are kept in {old}", file=sys.stderr)
