"""One path type for everything a run reads or writes: local paths and `gs://` URLs alike.

`as_path` gives a `pathlib.Path` for a local path (local behaviour exactly as before) and an
`etils.epath.Path` (what Orbax uses) for a `gs://bucket/...` URL, which goes through fsspec
(gcsfs); Orbax's arrays go through TensorStore's own GCS driver. Both have the pathlib API the
callers use. `pathlib.Path("gs://b/x")` would be a local folder `gs:/b/x`: no code path may
build a `pathlib.Path` from a user's path without `is_url` saying it is local.

Object storage differs from a disk in three ways that matter here, and the callers handle them:
no directory rename (outputs carry a completion marker written last, `qwenjax.atomic`), no
append (`append_text` rewrites the object), and libraries that only open local files (the
tokenizers' `from_file`, `np.fromfile`) are given the bytes instead (`Tokenizer.from_str`, one
ranged read per safetensors tensor).

Pointing the clients at a local emulator (tests): gcsfs and google-cloud-storage read
`STORAGE_EMULATOR_HOST`; TensorStore reads `TENSORSTORE_GCS_HTTP_URL` and, to skip Google auth,
`GOOGLE_AUTH_TOKEN_FOR_TESTING`.
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil

import fsspec
from etils import epath

# Listings are not cached: hosts of a pod read what another host wrote after a barrier, and a
# cached listing from before it would hide the new objects.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for `scheme://...` (gs://, memory:// ...), False for a local path."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> pathlib.Path | epath.Path:
    """The path type of qwenjax: local or gs:// alike. A local path stays as written (relative
    paths stay relative: messages show what the user typed)."""
    if is_url(path):
        return path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))
    return path if isinstance(path, pathlib.Path) else pathlib.Path(os.fspath(path))


def absolute(path: PathLike) -> pathlib.Path | epath.Path:
    """A local path made absolute with symlinks resolved (Orbax wants absolute paths); a URL
    is absolute already and is returned unchanged (never resolved against the cwd)."""
    if is_url(path):
        return as_path(path)
    return pathlib.Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _fs_and_path(path: PathLike):
    return fsspec.core.url_to_fs(os.fspath(path))


def glob_files(pattern: str) -> list[pathlib.Path | epath.Path]:
    """The files a glob matches (recursive `**` allowed), local or `gs://bucket/dir/*.jsonl`."""
    if not is_url(pattern):
        found = glob.glob(pattern, recursive=True)
        return [pathlib.Path(p) for p in found if os.path.isfile(p)]
    fs, inner = _fs_and_path(pattern)
    scheme = os.fspath(pattern).split("://", 1)[0]
    return [epath.Path(f"{scheme}://{p}") for p in fs.glob(inner) if fs.isfile(p)]


def read_range(path: PathLike, start: int, length: int) -> bytes:
    """`length` bytes of a file from `start` (fewer at its end): on object storage one ranged
    GET of exactly those bytes (a safetensors tensor), no read-ahead past them."""
    if not is_url(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(length)
    fs, inner = _fs_and_path(path)
    return fs.cat_file(inner, start=start, end=start + length)


def append_text(path: PathLike, text: str) -> None:
    """Append to a file; an object (no append on object storage) is read and written whole."""
    if not is_url(path):
        with open(path, "a") as f:
            f.write(text)
        return
    p = as_path(path)
    old = p.read_text() if p.exists() else ""
    p.write_text(old + text)


def rmtree(path: PathLike, ignore_errors: bool = False) -> None:
    """Delete a directory (or an object prefix) and everything in it."""
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
        return
    fs, inner = _fs_and_path(path)
    try:
        if fs.exists(inner):
            fs.rm(inner, recursive=True)
    except OSError:
        if not ignore_errors:
            raise


def move(src: PathLike, dst: PathLike) -> None:
    """Rename a file or directory; on object storage (no rename) copy every object, then delete
    the source."""
    if not is_url(src):
        os.rename(src, dst)
        return
    fs, inner = _fs_and_path(src)
    _, inner_dst = _fs_and_path(dst)
    if fs.isdir(inner):
        for f in fs.find(inner):
            fs.copy(f, inner_dst + f[len(inner):])
        fs.rm(inner, recursive=True)
    else:
        fs.copy(inner, inner_dst)
        fs.rm(inner)


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copy one file; either side may be a URL."""
    if not is_url(src) and not is_url(dst):
        shutil.copyfile(src, dst)
        return
    with as_path(src).open("rb") as fin, as_path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)


def size(path: PathLike) -> int:
    """A file's size in bytes."""
    if not is_url(path):
        return os.path.getsize(path)
    fs, inner = _fs_and_path(path)
    return fs.size(inner)
