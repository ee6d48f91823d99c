"""Cloud TPU slices: the names users type (`v5p-128`, `v6e-256`, `tpu7x-8`), the topology string
libtpu's compile-only devices accept (`v5p:4x4x4`), and the one table of per-chip figures that
the plan's fit check and roofline estimate read.

Naming (Cloud TPU accelerator types): `v4-N`, `v5p-N` and `tpu7x-N` count TensorCores, two per
chip; `v5e-N` (= `v5litepod-N`) and `v6e-N` count chips. What JAX sees as a device differs:
v4 and v5p run their two cores as one "megacore" device per chip, TPU7x (Ironwood) shows each of
its two chiplets as a device (so `tpu7x-8` is 4 chips, 8 devices, as `tpu7x:2x2x1` gives), v5e
and v6e have one core per chip. A mesh must multiply to the device count.

A topology string may also be given directly (`--topology v5p:4x4x4`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from qwenjax.errors import QwenJaxError


class PlanError(QwenJaxError):
    """A plan cannot be made as asked: unknown slice, a mesh that does not match it, a step that
    does not fit in the chips' memory."""


@dataclass(frozen=True)
class Chip:
    """Per-chip figures (bf16 peak FLOP/s, HBM GiB, HBM and ICI bandwidth in bytes/s)."""

    peak_flops: float
    hbm_gib: float
    hbm_bw: float
    ici_bw: float  # one direction, all links of the chip together
    devices_per_chip: int  # JAX devices per chip as compiled here
    dims: int  # 3 = 3D torus (AxBxC), 2 = 2D torus (AxB)
    cores_in_name: int  # accelerator-type N counts this many per chip


# Sources: Cloud TPU system architecture pages (docs.cloud.google.com/tpu/docs/v4, v5e, v5p,
# v6e, tpu7x), read 2026. The TPU7x page's comparison table gives v5p / v6e / TPU7x bf16 peak
# 459 / 918 / 2307 TFLOP/s, HBM 95 / 32 / 192 GiB, HBM bandwidth 2765 / 1638 / 7380 GB/s and
# bidirectional ICI 1200 / 800 / 1200 GB/s per chip (halved here: one direction). v4: 275
# TFLOP/s, 32 GiB at 1200 GB/s; its ICI (six links) is an approximation, 300 GB/s. v5e: 197
# TFLOP/s, 16 GiB at 819 GB/s, ICI 1600 Gbit/s = 200 GB/s.
CHIPS: dict[str, Chip] = {
    "v4": Chip(275e12, 32, 1200e9, 300e9, devices_per_chip=1, dims=3, cores_in_name=2),
    "v5e": Chip(197e12, 16, 819e9, 200e9, devices_per_chip=1, dims=2, cores_in_name=1),
    "v5p": Chip(459e12, 95, 2765e9, 600e9, devices_per_chip=1, dims=3, cores_in_name=2),
    "v6e": Chip(918e12, 32, 1638e9, 400e9, devices_per_chip=1, dims=2, cores_in_name=1),
    "tpu7x": Chip(2307e12, 192, 7380e9, 600e9, devices_per_chip=2, dims=3, cores_in_name=2),
}
ALIASES = {"v5litepod": "v5e"}


@dataclass(frozen=True)
class Slice:
    name: str  # as the user gave it
    family: str  # key of CHIPS
    topology: str  # e.g. "v5p:4x4x4"
    chips: int

    @property
    def chip(self) -> Chip:
        return CHIPS[self.family]

    @property
    def devices(self) -> int:
        return self.chips * self.chip.devices_per_chip

    @property
    def hbm_per_device(self) -> float:
        """Bytes of HBM one JAX device (one mesh position) may use."""
        return self.chip.hbm_gib * 2**30 / self.chip.devices_per_chip


def _grid(chips: int, dims: int) -> list[int] | None:
    """The Cloud TPU slice shape of `chips` chips: 2x2(x1) for 4, then doubling the smallest
    side (v5p-128 = 4x4x4, v5p-256 = 4x4x8, v6e-8 = 2x4, v6e-256 = 16x16). None if `chips` is
    not 4 times a power of two."""
    if chips < 4 or chips & (chips - 1):
        return None
    shape = [1, 2, 2] if dims == 3 else [2, 2]  # ascending
    while math.prod(shape) < chips:
        shape[0] *= 2
        shape.sort()
    return [2, 2, 1] if shape == [1, 2, 2] else shape


def parse_slice(name: str) -> Slice:
    """`v5p-128` | `v6e-256` | `v5litepod-16` | `tpu7x-8` | a topology `v5p:4x4x4` -> Slice."""
    valid = "v4-N, v5p-N, v5e-N (v5litepod-N), v6e-N, tpu7x-N or a topology such as v5p:4x4x4"
    text = name.strip()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    if m:
        family = ALIASES.get(m.group(1), m.group(1))
        if family not in CHIPS:
            raise PlanError(f"--topology {name!r}: unknown TPU {m.group(1)!r}; expected {valid}")
        sides = [int(s) for s in m.group(2).split("x")]
        if len(sides) != CHIPS[family].dims or min(sides) < 1:
            raise PlanError(f"--topology {name!r}: {family} slices have {CHIPS[family].dims} sides")
        return Slice(name, family, f"{family}:{m.group(2)}", math.prod(sides))
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    family = ALIASES.get(m.group(1), m.group(1)) if m else None
    if family not in CHIPS:
        raise PlanError(f"--topology {name!r} is not a Cloud TPU slice; expected {valid}")
    chip = CHIPS[family]
    count = int(m.group(2))
    chips = count // chip.cores_in_name
    shape = _grid(chips, chip.dims) if count % chip.cores_in_name == 0 else None
    if shape is None:
        unit = "TensorCores, 2 per chip" if chip.cores_in_name == 2 else "chips"
        raise PlanError(
            f"--topology {name!r}: {family}-N counts {unit}; N/{chip.cores_in_name} must be 4, 8, "
            f"16 ... chips (or give a topology such as {family}:{'x'.join(['2'] * chip.dims)})"
        )
    return Slice(name, family, f"{family}:{'x'.join(map(str, shape))}", chips)


def topology_devices(tpu: Slice) -> list:
    """Compile-only TPU devices for the slice (libtpu; no TPU needed), in the slice's order."""
    try:
        import libtpu  # noqa: F401  (the `tpu` extra: pip install -e '.[tpu]')
    except ImportError:
        raise PlanError(
            "planning for TPU needs libtpu: pip install -e '.[tpu]' (jax[tpu], ~700 MB)"
        ) from None
    # libtpu reads these at start-up; without them it logs warnings about a TPU VM it is not on.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{tpu.family}-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compile-only devices never touch a chip, so two plans (or a plan beside a test) may load
    # libtpu at once; without this the second fails on libtpu's process lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    # v4 runs megacore (one device per chip) on Cloud TPU VMs; libtpu's default config for v4 is
    # one device per core, so ask for megacore to compile the program users will run.
    extra = {"chip_config_name": "megacore"} if tpu.family == "v4" else {}
    try:
        devices = topologies.get_topology_desc(
            platform="tpu", topology_name=tpu.topology, **extra
        ).devices
    except Exception as e:  # noqa: BLE001 -- libtpu's RuntimeError / JaxRuntimeError: say which slice, one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"--topology {tpu.name!r} ({tpu.topology}): libtpu refused it: {first}")
    if len(devices) != tpu.devices:
        raise PlanError(
            f"--topology {tpu.name!r}: libtpu gave {len(devices)} devices for {tpu.topology}, "
            f"expected {tpu.devices}"
        )
    return list(devices)
