"""Attention kernels that GSPMD cannot partition (a Mosaic or cuDNN custom call) run per device:
inside a shard_map over the mesh's batch axes, and its head axes when the kv heads split as the
query heads do; each device attends over its own whole rows.

Dimension letters: B batch, T length, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from qwenjax.sharding import current_mesh, mesh_axes


def per_device(local, q, k, v, *per_token):
    """local(q, k, v, *per_token) on each device's rows. q [B,T,H,Dh], k/v [B,T,K,Dh],
    per_token arrays [B,T] -> [B,T,H,Dh]. Without a mesh (or on one device) it is `local`."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return local(q, k, v, *per_token)
    B, _, H, _ = q.shape
    batch = mesh_axes("batch", B) or None
    heads = mesh_axes("act_heads", H) or None
    if heads is not None and k.shape[2] % math.prod(mesh.shape[a] for a in heads):
        heads = None  # kv heads do not split as the query heads do: keep heads whole
    tokens, rows = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(tokens,) * 3 + (rows,) * len(per_token),
                         out_specs=tokens, check_vma=False)(q, k, v, *per_token)
