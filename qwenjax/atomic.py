"""Write a directory atomically: build it beside the target, swap it in only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `target`, on error it is removed
    and `target` (if it existed) is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, backup)
        os.rename(tmp, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(tmp, target)
