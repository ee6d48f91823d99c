"""Mesh axes, the logical-axis table, and the helpers that turn logical names into shardings.

Model code speaks only logical names (`batch`, `embed`, `heads`, `experts` ...). `DEFAULT_RULES`
maps each to a mesh axis (or a tuple of them, or None = replicated); an experiment may override
rows. A table that would put one mesh axis on two dimensions of one tensor is refused when the
spec is built, naming the tensor's axes.

Sharding mode: we build meshes with `AxisType.Auto` (GSPMD/Shardy propagation plus explicit
constraints at block boundaries), not jax 0.10's default Explicit axes. Auto lets the same model
code run unsharded, under `jit` with `NamedSharding`s, and inside `shard_map` regions without
threading sharding types through every einsum; our constraints pin the layouts that matter.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qwenjax.errors import MeshError

MESH_AXES = ("data", "fsdp", "expert", "tensor", "context")

# logical axis -> mesh axis / tuple of mesh axes / None (replicated)
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": "context",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "layers": None,
    "vocab": "tensor",
    # Dense weights are split over fsdp x expert (for MoE models the expert devices would
    # otherwise each hold every dense weight and its AdamW moments whole); expert weights split
    # their D over fsdp only, as `expert` already splits their E.
    "embed": ("fsdp", "expert"),
    "expert_embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "norm": None,
    "router_experts": None,
    "linear_k_heads": "tensor",  # Gated DeltaNet key heads
    "linear_v_heads": "tensor",  # Gated DeltaNet value heads
    "conv": None,  # causal conv taps
}


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices with axes `MESH_AXES`; axes not named have size 1."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; valid axes are {list(MESH_AXES)}")
    sizes = [shape.get(a, 1) for a in MESH_AXES]
    # 8.9 must not become 8 devices: integers only (NumPy's too), never bools.
    if any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1 for s in sizes):
        raise MeshError(f"mesh axis sizes must be integers >= 1, got {dict(shape)}")
    sizes = [int(s) for s in sizes]
    devices = list(devices if devices is not None else jax.devices())
    if math.prod(sizes) != len(devices):
        named = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes) if s > 1) or "all 1"
        raise MeshError(
            f"mesh {named} needs {math.prod(sizes)} devices but {len(devices)} are available"
        )
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_rules(rules: Mapping[str, str | tuple[str, ...] | None]) -> dict:
    """Validate an axis table (unknown logical or mesh names) and return it merged over defaults."""
    merged = dict(DEFAULT_RULES)
    for logical, target in rules.items():
        if logical not in DEFAULT_RULES:
            raise MeshError(f"axis table: unknown logical axis {logical!r}")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise MeshError(f"axis table: {logical!r} maps to unknown mesh axes {bad}")
        merged[logical] = target if isinstance(target, str) or target is None else tuple(target)
    return merged


def logical_to_spec(
    axes: Sequence[str | None], rules: Mapping | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for a tensor whose dimensions carry these logical names.

    Mesh axes of size 1 are dropped. A mesh axis used by two dimensions is an error.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: dict[str, str] = {}
    spec = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise MeshError(f"logical axis {name!r} has no row in the axis table")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape[t] > 1)
        for t in targets:
            if t in used:
                raise MeshError(
                    f"axis table puts mesh axis {t!r} on both {used[t]!r} and {name!r} "
                    f"of one tensor with axes {tuple(axes)}"
                )
            used[t] = name
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dimensions they do not divide (e.g. 2 kv heads over tensor=4)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept, size = [], 1
        for n in names:
            if dim % (size * mesh.shape[n]) == 0:
                kept.append(n)
                size *= mesh.shape[n]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def named_sharding(
    mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int], rules: Mapping | None = None
) -> NamedSharding:
    return NamedSharding(mesh, fit_spec(logical_to_spec(axes, rules, mesh), shape, mesh))


# ---- activation constraints ---------------------------------------------------------------------
# Model code calls `constrain(x, ("batch", "length", "act_embed"))` at block boundaries. Under
# `with activate(mesh, rules):` it pins that layout; with no mesh active it is the identity, so
# the same model code runs on one device.

_RULES: contextvars.ContextVar[dict] = contextvars.ContextVar("qwenjax_rules", default=DEFAULT_RULES)
_LAYOUT: contextvars.ContextVar[str] = contextvars.ContextVar("qwenjax_layout", default="zigzag")
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "qwenjax_platform", default=None
)
_DEVICE: contextvars.ContextVar[jax.Device | None] = contextvars.ContextVar(
    "qwenjax_device", default=None
)
PLATFORMS = ("cpu", "gpu", "tpu")


@contextlib.contextmanager
def activate(
    mesh: Mesh, rules: Mapping | None = None, context_layout: str = "zigzag",
    platform: str | None = None,
):  # fmt: skip
    """Make `mesh` (and an axis table) current for jit tracing and `constrain`.

    With `context` > 1, token arrays given to the model are sequence-sharded and already in
    `context_layout` (see ops/context_layout.py); the layers run ring attention and the
    sequence-parallel delta rule, and need the layout only to order delta-rule pieces.
    `platform` ("cpu" | "gpu" | "tpu") overrides the platform read from the mesh's devices
    (`target_platform`), e.g. to trace the TPU program over CPU devices."""
    token = _RULES.set(check_rules(rules or {}))
    layout_token = _LAYOUT.set(context_layout)
    platform_token = _PLATFORM.set(mesh_platform(mesh) if platform in (None, "auto") else
                                   _check_platform(platform))  # fmt: skip
    device_token = _DEVICE.set(mesh.devices.flat[0])
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _RULES.reset(token)
        _LAYOUT.reset(layout_token)
        _PLATFORM.reset(platform_token)
        _DEVICE.reset(device_token)


def _check_platform(platform: str) -> str:
    if platform not in PLATFORMS:
        raise MeshError(f"platform {platform!r} is not one of auto, {', '.join(PLATFORMS)}")
    return platform


def device_platform(device: jax.Device) -> str:
    """"cpu" | "gpu" | "tpu" (compile-only TPU devices on a CPU host say "tpu")."""
    return "gpu" if device.platform in ("cuda", "rocm") else device.platform


def mesh_platform(mesh: Mesh) -> str:
    return device_platform(mesh.devices.flat[0])


def target_platform() -> str:
    """The platform the program being built will run on, which decides kernels (MoE grouped
    matmul, expert exchange, attention): the active mesh's (see `activate`), never
    `jax.default_backend()`, which on a CPU host compiling for TPU says "cpu". Without an active
    mesh the program runs on the default device, so its platform is the answer."""
    platform = _PLATFORM.get()
    return platform if platform is not None else device_platform(jax.devices()[0])


def target_device() -> jax.Device:
    """A device of the active mesh (the default device without one): what kernels that depend
    on the chip generation ask (cuDNN's compute capability)."""
    device = _DEVICE.get()
    return device if device is not None else jax.devices()[0]


def current_layout() -> str:
    return _LAYOUT.get()


def context_parallel():
    """(mesh, layout) when the current mesh splits sequences over `context`, else None."""
    mesh = current_mesh()
    if mesh is None or mesh.shape["context"] == 1:
        return None
    return mesh, _LAYOUT.get()


def context_size() -> int:
    """How many devices the current mesh splits sequences over (1 without a `context` axis)."""
    ctx = context_parallel()
    return 1 if ctx is None else ctx[0].shape["context"]


def mesh_axes(logical: str, size: int) -> tuple[str, ...]:
    """The current mesh's axes (size > 1) that shard a dimension of `size` named `logical`."""
    mesh = current_mesh()
    if mesh is None:
        return ()
    entry = fit_spec(logical_to_spec((logical,), _RULES.get(), mesh), (size,), mesh)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def current_rules() -> dict:
    """The axis table made current by `activate` (the default table otherwise)."""
    return _RULES.get()


def current_mesh():
    """The mesh made current by `activate` (abstract under tracing), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x, axes: Sequence[str | None]):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = fit_spec(logical_to_spec(axes, _RULES.get(), mesh), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)
