"""Device meshes and the logical-axis rules table.

Axis vocabulary (the one place it is written down):
  weights:     vocab, embed, q_heads, kv_heads, head_dim, mlp, layers
  activations: batch, length, act_embed, act_heads, act_mlp
  cache:       cache_batch, cache_length, cache_kv_heads, cache_head_dim
  mesh axes:   data, fsdp, tensor

Every parameter carries its logical axis names as NNX ``out_sharding`` metadata (see llama_jax.model). A rules
table (plain dict) maps each logical axis to a mesh axis, a tuple of mesh axes, or None (replicated).
A dimension whose size the mapped mesh axes do not divide is replicated instead (e.g. 8 KV heads on a 16-way
tensor axis).
"""

from __future__ import annotations

from typing import Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # weights
    "vocab": "tensor", "embed": "fsdp", "q_heads": "tensor", "kv_heads": "tensor", "head_dim": None,
    "mlp": "tensor", "layers": None,
    # activations
    "batch": ("data", "fsdp"), "length": None, "act_embed": None, "act_heads": "tensor", "act_mlp": "tensor",
    # KV cache
    "cache_batch": ("data", "fsdp"), "cache_length": None, "cache_kv_heads": "tensor", "cache_head_dim": None,
}


def _mesh_axes(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(axes, shape, mesh: jax.sharding.Mesh, rules: Mapping | None = None) -> PartitionSpec:
    """PartitionSpec for an array with logical ``axes`` and ``shape`` on ``mesh``.

    Mesh axes absent from the mesh or of size 1 are dropped; a dimension the mapped axes do not divide is
    replicated. Raises ValueError for an unknown logical axis or two dimensions mapped to one mesh axis.
    """
    rules = DEFAULT_RULES if rules is None else rules
    spec, used = [], set()
    for name, size in zip(axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule (known: {', '.join(sorted(rules))})")
        mesh_axes = tuple(a for a in _mesh_axes(rules[name]) if a in mesh.shape and mesh.shape[a] > 1)
        n = 1
        for a in mesh_axes:
            n *= mesh.shape[a]
        if not mesh_axes or size % n:
            spec.append(None)
            continue
        clash = used.intersection(mesh_axes)
        if clash:
            raise ValueError(f"logical axis {name!r} maps to mesh axis {sorted(clash)[0]!r}, "
                             f"already used by another dimension of axes {tuple(axes)}")
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Mapping | None = None):
    """NamedShardings for every variable of an ``nnx.State`` (concrete or abstract), from its metadata."""
    def one(var):
        axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
