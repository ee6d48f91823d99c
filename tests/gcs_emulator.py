"""A local Cloud Storage emulator (`gcp-storage-emulator` from PyPI) for offline tests.

`emulator()` starts it on 127.0.0.1 at a free port with one in-memory bucket, points every client
at it through the environment (inherited by the CLI subprocesses the tests start), and stops it:
  gcsfs (etils.epath, fsspec)                  STORAGE_EMULATOR_HOST
  (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: the Storage Control API is not emulated)
  TensorStore (Orbax's arrays)                 TENSORSTORE_GCS_HTTP_URL, and
                                               GOOGLE_AUTH_TOKEN_FOR_TESTING to skip Google auth

One gap of the emulator is filled here: its media downloads carry no `x-goog-generation` header,
which Cloud Storage always sends and TensorStore requires (without it every OCDBT manifest write
fails with "Malformed StorageGeneration"); the launcher below adds that header from the object's
metadata, and changes nothing else.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

BUCKET = "qwenjax-test"

_LAUNCH = """
import signal, sys, threading
from gcp_storage_emulator.handlers import objects

_download = objects.download

def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the handler already answered 404
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])

objects.download = download
from gcp_storage_emulator.server import create_server  # builds its routes with the patch

server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
server.start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
server.stop()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the storage emulator exited: {log.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("the storage emulator did not start listening")


@contextlib.contextmanager
def emulator() -> Iterator[str]:
    """Yield "gs://BUCKET" on a fresh emulator; the environment is restored afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GOOGLE_CLOUD_PROJECT": "test",
        # gcsfs otherwise asks the Storage Control API (gRPC, not emulated) for each bucket's
        # type and logs a warning every time it gets no answer
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    # Its log goes to a file: the emulator prints a traceback for each request a client drops
    # (a killed process), and an unread pipe would fill and stop it.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(port), BUCKET],
            stdout=subprocess.DEVNULL, stderr=log, text=True,
        )
        try:
            _wait_listening(port, proc, log)
            os.environ.update(env)
            import gcsfs

            gcsfs.GCSFileSystem.clear_instance_cache()  # no client made for another endpoint
            yield f"gs://{BUCKET}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
