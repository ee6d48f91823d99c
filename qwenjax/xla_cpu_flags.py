"""XLA:CPU settings qwenjax needs before the CPU backend starts (applied on `import qwenjax`).

YNNPACK dot fusions leak with several CPU devices. jax 0.10.2's XLA:CPU runs single dots as
YNNPACK fusions (`kind=kCustom`, `__ynn_fusion`). On a host platform with more than one device
(`--xla_force_host_platform_device_count=N`, the simulated meshes of tests and benchmarks), every
call of such a fusion inside nested loops keeps a few KB alive until the whole program returns,
so memory grows with the number of computed attention block pairs rather than with the sequence:
a causal 262K-token ring forward on 8 devices held 2.5 GB, a 1M-token one went past 24 GB.
Measured with `tools/bench_ring_memory.py` and a 30-line reproduction (NOTES.md, "Ring memory"):
  - one device: flat; two or more devices: ~5 KB per dot call, freed only when the program ends;
  - the same with glibc, jemalloc and tcmalloc (live memory, not fragmentation), with or without
    `lax.cond`, with Eigen's thread pool on or off; gone with YNNPACK fusions off
    (`--xla_cpu_experimental_ynn_fusion_type=`); `LIBRARY_FUSION_TYPE_DOT` alone still leaks.
So with several CPU devices qwenjax turns YNNPACK fusions off (dots go to Eigen; one-device
runs keep YNNPACK, which is faster there). A user who sets the flag themselves keeps theirs.
Only CPU compiles read this flag; TPU and GPU programs are unaffected.
"""

from __future__ import annotations

import os
import re

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def host_device_count(flags: str) -> int:
    """The simulated CPU device count that `flags` (an XLA_FLAGS string) asks for (default 1)."""
    found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return int(found[-1]) if found else 1


def apply() -> bool:
    """Turn YNNPACK fusions off when XLA_FLAGS asks for several CPU devices; True if it did.

    Must run before the CPU backend is created (the first JAX computation), which importing
    qwenjax first guarantees; importing jax alone does not create it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags or host_device_count(flags) <= 1:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
    return True
