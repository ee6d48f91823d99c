"""Token layouts for sequence (context) parallelism: which global tokens each device holds.

A sequence of T tokens is split over n devices on the `context` mesh axis. After `to_layout`,
the array is still [.., T, ..] but its slots are reordered so that an even split of the T axis
over n devices gives each device the tokens the layout assigns it:

- `contiguous`: device r holds tokens [r*T/n, (r+1)*T/n) — one piece per device.
- `zigzag` (default): T cut into 2n chunks; device r holds chunks r and 2n-1-r — two pieces per
  device. Causal attention then costs every device the same (early + late chunk).
- `striped`: device r holds tokens r, r+n, r+2n, ... (T/n pieces of one token).

Every op that runs on a layout is position-aware (masks from global positions and segment ids),
so nothing else needs to know the layout; the delta rule, which is a recurrence, needs the
pieces (`pieces`) to know where each run of consecutive tokens sits in the global order.
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


def layout_unit(n: int, layout: str) -> int:
    """What sequence lengths must be a multiple of to split over n devices in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown context layout {layout!r}; expected one of {LAYOUTS}")
    return 2 * n if layout == "zigzag" else n


def check_divisible(T: int, n: int, layout: str) -> None:
    """Raise ValueError unless T tokens split evenly over n devices in `layout`."""
    unit = layout_unit(n, layout)
    if T % unit:
        raise ValueError(
            f"sequence length {T} is not divisible by {unit} "
            f"(context={n}, layout {layout!r} needs a multiple of {unit})"
        )


def pieces(T: int, n: int, layout: str) -> list[list[tuple[int, int]]]:
    """For each device, its runs of consecutive global tokens as (global start, length), in the
    order they appear in the device's local slots."""
    check_divisible(T, n, layout)
    if layout == "contiguous":
        L = T // n
        return [[(r * L, L)] for r in range(n)]
    if layout == "zigzag":
        L = T // (2 * n)
        return [[(r * L, L), ((2 * n - 1 - r) * L, L)] for r in range(n)]
    return [[(r + i * n, 1) for i in range(T // n)] for r in range(n)]


def permutation(T: int, n: int, layout: str) -> np.ndarray:
    """int [T]: the global token index held by each slot of the laid-out sequence."""
    return np.concatenate(
        [np.arange(s, s + L) for dev in pieces(T, n, layout) for s, L in dev]
    ).astype(np.int32)


def inverse_permutation(T: int, n: int, layout: str) -> np.ndarray:
    """int [T]: the slot of the laid-out sequence holding each global token."""
    perm = permutation(T, n, layout)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(T, dtype=np.int32)
    return inv


def to_layout(x, n: int, layout: str, axis: int = 1):
    """Reorder the token axis of x (numpy or jax array) from global order into `layout`."""
    return x.take(permutation(x.shape[axis], n, layout), axis=axis)


def from_layout(x, n: int, layout: str, axis: int = 1):
    """Inverse of `to_layout`: back to global token order."""
    return x.take(inverse_permutation(x.shape[axis], n, layout), axis=axis)
