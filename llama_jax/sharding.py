"""Device meshes, the logical-axis rules table, validation, and sharded-from-birth creation.

Axis vocabulary (the one place it is written down):
  weights:     vocab, embed, q_heads, kv_heads, head_dim, mlp, layers
  activations: batch, length, act_embed, act_heads, act_mlp
  cache:       cache_batch, cache_length, cache_kv_heads, cache_head_dim
  mesh axes:   data, fsdp, tensor

Every parameter carries its logical axis names as NNX ``out_sharding`` metadata (see llama_jax.model). A rules
table (plain dict) maps each logical axis to a mesh axis, a tuple of mesh axes, or None (replicated); swapping
tensor parallelism for FSDP is a change of table, not of code (MaxText ``logical_axis_rules``).

* ``tensor`` (Megatron-style, arXiv:1909.08053 section 3) splits heads, the MLP hidden dim and the vocabulary;
  a tensor axis that does not divide ``n_heads``, ``hidden_dim`` or ``vocab_size`` is refused
  (:func:`validate`). KV heads fewer than (or not divisible by) the tensor axis are replicated instead
  (8 KV heads on a 16-way tensor axis): each device keeps every KV head and reads the ones its query heads use.
* ``fsdp`` (ZeRO-3, arXiv:1910.02054) splits the model dimension of every weight; XLA gathers it per layer.
* ``data`` splits only the batch (and the KV cache's batch).

All meshes are built with explicit ``AxisType.Auto`` axes (the compiler propagates shardings from the jitted
function's in/out shardings); no ``pjit``, no ``with mesh:``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, "str | tuple[str, ...] | None"]

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # weights
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    # KV cache
    "cache_batch": ("data", "fsdp"),
    "cache_length": None,
    "cache_kv_heads": "tensor",
    "cache_head_dim": None,
}

#: Logical axes of every array kind the rules must place consistently (parameters, KV cache, activations).
#: Two logical axes of one tuple may not share a mesh axis (checked by :func:`validate_rules`).
ARRAY_AXES: dict[str, tuple[str, ...]] = {
    "embedder.embedding": ("vocab", "embed"),
    "norm.scale": ("layers", "embed"),
    "attention.q_proj": ("layers", "embed", "q_heads", "head_dim"),
    "attention.k_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "attention.o_proj": ("layers", "q_heads", "head_dim", "embed"),
    "mlp.gate_proj": ("layers", "embed", "mlp"),
    "mlp.down_proj": ("layers", "mlp", "embed"),
    "lm_head": ("embed", "vocab"),
    "kv_cache": ("layers", "cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim"),
    "activations": ("batch", "length", "act_embed"),
    "attention activations": ("batch", "length", "act_heads"),
    "mlp activations": ("batch", "length", "act_mlp"),
}

#: Logical axes whose size the mapped mesh axes may fail to divide: they are replicated, not refused.
REPLICATE_IF_INDIVISIBLE = frozenset({"kv_heads", "cache_kv_heads", "batch", "cache_batch", "length", "cache_length"})


# ----------------------------------------------------------------------------------------------- meshes
def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    axis_type: AxisType = AxisType.Auto,
) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices, every process).

    Built with ``jax.make_mesh`` and the axis types given explicitly (default ``AxisType.Auto``: shardings are
    propagated by the compiler from the jitted functions' in/out shardings).

    Raises:
      ValueError: an axis size below 1, or data * fsdp * tensor != the number of devices (names the axes and
        the device count).
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh axis {name!r} must be a positive integer, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    total = data * fsdp * tensor
    if total != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {total} devices, but "
            f"{len(devices)} device(s) are available; the mesh axes must multiply to the device count"
        )
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(axis_type,) * 3, devices=devices)


def parse_mesh_sizes(flag: str) -> dict[str, int]:
    """Parses a ``--mesh`` flag such as ``"data=1,fsdp=2,tensor=4"`` into axis sizes (missing axes are 1;
    "" means all 1). Returns a dict with keys data, fsdp, tensor.

    Raises:
      ValueError: unknown axis name, repeated axis, or a size that is not a positive integer (names the item).
    """
    out = {a: 1 for a in MESH_AXES}
    seen = set()
    for item in filter(None, (s.strip() for s in (flag or "").split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"--mesh item {item!r} must look like axis=size (axes: {', '.join(MESH_AXES)})")
        if name not in out:
            raise ValueError(f"--mesh: unknown mesh axis {name!r} in {flag!r} (axes: {', '.join(MESH_AXES)})")
        if name in seen:
            raise ValueError(f"--mesh: axis {name!r} given twice in {flag!r}")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"--mesh: size of axis {name!r} must be an integer, got {value!r}") from None
        if size < 1:
            raise ValueError(f"--mesh: size of axis {name!r} must be positive, got {size}")
        seen.add(name)
        out[name] = size
    return out


def parse_mesh(flag: str, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The mesh of a ``--mesh`` flag: ``make_mesh(**parse_mesh_sizes(flag), devices=devices)``.

    Raises:
      ValueError: a malformed flag (:func:`parse_mesh_sizes`) or a mesh whose size differs from the device count
        (:func:`make_mesh`).
    """
    return make_mesh(**parse_mesh_sizes(flag), devices=devices)


# ----------------------------------------------------------------------------------------------- rules
def _mesh_axes(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def validate_rules(rules: Rules, mesh: jax.sharding.Mesh | None = None) -> None:
    """Refuses impossible or colliding rules.

    Raises:
      ValueError: a rule naming a mesh axis that does not exist (names the logical axis and the mesh axis), a
        logical axis used by the model with no rule, a rule repeating a mesh axis, or two logical axes of one
        array kind mapped to the same mesh axis (names both logical axes, the mesh axis and the array kind,
        e.g. ``embed`` and ``q_heads`` both on ``tensor`` collide in ``attention.q_proj``).
    """
    known_mesh = tuple(mesh.axis_names) if mesh is not None else MESH_AXES
    for name, rule in rules.items():
        axes = _mesh_axes(rule)
        for a in axes:
            if a not in known_mesh:
                raise ValueError(
                    f"sharding rule {name!r} -> {rule!r}: mesh axis {a!r} does not exist "
                    f"(mesh axes: {', '.join(known_mesh)})"
                )
        if len(set(axes)) != len(axes):
            raise ValueError(f"sharding rule {name!r} -> {rule!r} repeats a mesh axis")
    for kind, logical in ARRAY_AXES.items():
        owner: dict[str, str] = {}
        for name in logical:
            if name not in rules:
                raise ValueError(f"logical axis {name!r} (of {kind}) has no sharding rule")
            for a in _mesh_axes(rules[name]):  # refused even on a size-1 axis: the table is wrong anywhere
                if a in owner:
                    raise ValueError(
                        f"sharding rules collide: logical axes {owner[a]!r} and {name!r} both map "
                        f"to mesh axis {a!r}, and both are dimensions of {kind} {logical}"
                    )
                owner[a] = name


def validate(config, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> None:
    """Checks that ``config`` can be sharded on ``mesh`` with ``rules`` (also runs :func:`validate_rules`).

    A mesh axis that does not divide the dimension it shards is refused, naming the mesh axis, the logical axis
    and the config field (e.g. a tensor axis of 3 and ``n_heads`` = 8), except for the axes in
    ``REPLICATE_IF_INDIVISIBLE`` (KV heads fewer than the tensor axis are replicated). The one rule of
    :func:`init_sharded`, :func:`shard_model`, ``llama_jax.checkpoint.load`` and ``llama_jax.quant.load``: query
    heads, MLP and vocabulary are never silently replicated.

    Raises:
      ValueError: as above.
    """
    rules = DEFAULT_RULES if rules is None else rules
    validate_rules(rules, mesh)
    sizes = {
        "vocab": ("vocab_size", config.vocab_size),
        "embed": ("dim", config.dim),
        "q_heads": ("n_heads", config.n_heads),
        "kv_heads": ("n_kv_heads", config.n_kv_heads),
        "head_dim": ("head_dim", config.head_dim),
        "mlp": ("hidden_dim", config.hidden_dim),
        "layers": ("n_layers", config.n_layers),
    }
    for logical, (field, size) in sizes.items():
        if logical in REPLICATE_IF_INDIVISIBLE:
            continue
        axes = [a for a in _mesh_axes(rules.get(logical)) if mesh.shape[a] > 1]
        n = math.prod(mesh.shape[a] for a in axes)
        if axes and size % n:
            raise ValueError(
                f"mesh axis {'x'.join(repr(a) for a in axes)} of size {n} does not divide "
                f"{field}={size} (logical axis {logical!r}); choose a mesh axis size dividing "
                f"{field} or change the rule for {logical!r}"
            )


def logical_to_spec(axes, shape, mesh: jax.sharding.Mesh, rules: Mapping | None = None) -> PartitionSpec:
    """PartitionSpec for an array with logical ``axes`` and ``shape`` on ``mesh``.

    Mesh axes absent from the mesh or of size 1 are dropped; a dimension the mapped axes do not divide is
    replicated (this is how KV heads fewer than the tensor axis end up replicated; :func:`validate` refuses the
    other indivisible cases up front). Raises ValueError for an unknown logical axis or two dimensions mapped to
    one mesh axis.
    """
    rules = DEFAULT_RULES if rules is None else rules
    spec, used = [], set()
    for name, size in zip(axes, shape, strict=False):
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
            raise ValueError(
                f"logical axis {name!r} maps to mesh axis {sorted(clash)[0]!r}, "
                f"already used by another dimension of axes {tuple(axes)}"
            )
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def named_sharding(axes, shape, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> NamedSharding:
    """``NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))``."""
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Mapping | None = None):
    """NamedShardings for every variable of an ``nnx.State`` (concrete or abstract), from its metadata.

    Returns a tree of the same structure whose Variables hold a ``NamedSharding`` (usable as jit in/out
    shardings for the state, or with ``jax.device_put``).
    """

    def one(var):
        axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=_is_var)


# ------------------------------------------------------------------------------- sharded from birth
def abstract_model(config, rngs_seed: int = 0, param_dtype=None, **model_kwargs):
    """``nnx.eval_shape`` of ``Llama(config, ...)``: a model of ``ShapeDtypeStruct`` leaves (nothing allocated)."""
    from llama_jax.model import Llama

    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(rngs_seed), param_dtype=param_dtype, **model_kwargs))


def abstract_state(
    config, mesh: jax.sharding.Mesh, rules: Rules | None = None, rngs_seed: int = 0, param_dtype=None, **model_kwargs
):
    """(graphdef, state) of the model with ``ShapeDtypeStruct`` leaves carrying their mesh shardings.

    Used for ahead-of-time lowering (llama_jax.plan) and as Orbax restore targets. Nothing is allocated.
    """
    graphdef, state = nnx.split(abstract_model(config, rngs_seed, param_dtype, **model_kwargs))
    shardings = state_shardings(state, mesh, rules)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.get_value())),
        state,
        shardings,
        is_leaf=_is_var,
    )
    return graphdef, state


def init_sharded(
    config, mesh: jax.sharding.Mesh, rules: Rules | None = None, rngs_seed: int = 0, param_dtype=None, **model_kwargs
):
    """Initialises ``Llama(config, rngs=nnx.Rngs(rngs_seed), param_dtype=...)`` straight into sharded arrays.

    The initialiser runs under ``jax.jit`` with ``out_shardings`` taken from the abstract model
    (``nnx.eval_shape``), so each device computes only its own shards: no full parameter exists on one device
    or on the host. With JAX's partitionable threefry the values equal the unsharded ``Llama`` of the same seed.

    Args:
      config: the architecture (validated against ``mesh`` / ``rules`` by :func:`validate`).
      mesh: from :func:`make_mesh`.
      rules: logical-axis rules (default ``DEFAULT_RULES``).
      rngs_seed: seed of ``nnx.Rngs``.
      param_dtype: parameter dtype (default: the model's default).
      **model_kwargs: forwarded to ``Llama`` (dtype, attention_impl, remat).

    Returns:
      a ``Llama`` whose parameters are ``jax.Array``s with ``NamedSharding``s on ``mesh``.

    Raises:
      ValueError: from :func:`validate`.
    """
    from llama_jax.model import Llama

    validate(config, mesh, rules)
    graphdef, abstract = nnx.split(abstract_model(config, rngs_seed, param_dtype, **model_kwargs))
    shardings = state_shardings(abstract, mesh, rules)

    def make():
        return nnx.state(Llama(config, rngs=nnx.Rngs(rngs_seed), param_dtype=param_dtype, **model_kwargs))

    make = jax.jit(make, out_shardings=shardings)
    return nnx.merge(graphdef, make())


def shard_model(model, mesh: jax.sharding.Mesh, rules: Rules | None = None):
    """Moves an existing model's state onto ``mesh`` (``jax.device_put`` with :func:`state_shardings`), in place.

    For models built elsewhere (e.g. a small model on the host in a test). Returns the model.
    """
    validate(model.config, mesh, rules)
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
    return model


def cache_shardings(config, mesh: jax.sharding.Mesh, batch: int, max_len: int, rules: Rules | None = None):
    """A ``KVCache`` of ``NamedSharding``s for a cache of ``batch`` rows and ``max_len`` slots.

    Logical axes from ``llama_jax.kv_cache.cache_logical_axes()``: k/v [L, B, S, K, H] ->
    (layers, cache_batch, cache_length, cache_kv_heads, cache_head_dim); lengths [B] -> (cache_batch,).
    A batch the (data, fsdp) axes do not divide, or KV heads fewer than the tensor axis, are replicated.
    """
    from llama_jax.kv_cache import cache_logical_axes

    axes = cache_logical_axes()
    kv_shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
    return axes.replace(
        k=named_sharding(axes.k, kv_shape, mesh, rules),
        v=named_sharding(axes.v, kv_shape, mesh, rules),
        lengths=named_sharding(axes.lengths, (batch,), mesh, rules),
    )


def init_cache_sharded(
    config, mesh: jax.sharding.Mesh, batch: int, max_len: int, dtype=jnp.float32, rules: Rules | None = None
):
    """An empty KV cache created directly in its shards (``init_cache`` under jit with out_shardings)."""
    from llama_jax.kv_cache import init_cache

    return init_cache(config, batch, max_len, dtype, sharding=cache_shardings(config, mesh, batch, max_len, rules))


def abstract_cache(
    config, mesh: jax.sharding.Mesh, batch: int, max_len: int, dtype=jnp.float32, rules: Rules | None = None
):
    """A ``KVCache`` of ``ShapeDtypeStruct``s with shardings (for ahead-of-time lowering; nothing allocated)."""
    from llama_jax.kv_cache import KVCache

    sh = cache_shardings(config, mesh, batch, max_len, rules)
    kv_shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
    return KVCache(
        k=jax.ShapeDtypeStruct(kv_shape, jnp.dtype(dtype), sharding=sh.k),
        v=jax.ShapeDtypeStruct(kv_shape, jnp.dtype(dtype), sharding=sh.v),
        lengths=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sh.lengths),
    )


def batch_sharding(mesh: jax.sharding.Mesh, shape, rules: Rules | None = None) -> NamedSharding:
    """Sharding of an int32 token / position batch [B, T] (``batch`` on (data, fsdp), ``length`` replicated)."""
    return named_sharding(("batch", "length")[: len(shape)], shape, mesh, rules)


def per_device_bytes(tree) -> dict:
    """Largest bytes held by one device for each array of ``tree`` (concrete arrays or sharded ShapeDtypeStructs).

    Returns ``{path: (bytes_on_the_fullest_device, total_bytes)}``; reads ``addressable_shards`` for concrete
    arrays and ``sharding.shard_shape`` for abstract ones.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        total = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        if isinstance(leaf, jax.Array):
            per = max(s.data.nbytes for s in leaf.addressable_shards)
        else:
            per = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
        out[jax.tree_util.keystr(path)] = (per, total)
    return out


# ------------------------------------------------------------------------------- sharded calls
def jit_model_call(
    graphdef,
    state_sh,
    mesh: jax.sharding.Mesh,
    batch: int,
    vocab_size: int,
    *,
    cache_sh=None,
    last_only: bool = False,
    rules: Rules | None = None,
):
    """``jax.jit`` of ``nnx.merge(graphdef, state)(tokens[, kv_cache=cache])`` with explicit shardings.

    Args:
      graphdef: from ``nnx.split(model)``.
      state_sh: the state's shardings (:func:`state_shardings`).
      mesh: the device mesh.
      batch: B, rows of every call (the logits / token shardings depend on whether (data, fsdp) divide it).
      vocab_size: V.
      cache_sh: None for the uncached forward ``f(state, tokens) -> logits``; a ``KVCache`` of shardings
        (:func:`cache_shardings`) for ``f(state, tokens, cache) -> (logits, cache')`` with the cache donated
        (prefill: T = prompt chunk; decode: T = 1).
      last_only: return only the last position's logits [B, V] (what prefill / decode need).
      rules: logical-axis rules.

    Returns:
      the jitted function. tokens: int32 [B, T] (batch-sharded); logits float32 [B, T, V] or [B, V],
      sharded over batch and vocab.
    """
    tok_sh = batch_sharding(mesh, (batch, 1), rules)
    if last_only:
        logits_sh = named_sharding(("batch", "vocab"), (batch, vocab_size), mesh, rules)
    else:
        logits_sh = named_sharding(("batch", "length", "vocab"), (batch, 1, vocab_size), mesh, rules)

    if cache_sh is None:

        def forward(state, tokens):
            logits = nnx.merge(graphdef, state)(tokens)
            return logits[:, -1] if last_only else logits

        return jax.jit(forward, in_shardings=(state_sh, tok_sh), out_shardings=logits_sh)

    def cached(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, kv_cache=cache)
        return (logits[:, -1] if last_only else logits), cache

    return jax.jit(
        cached, in_shardings=(state_sh, tok_sh, cache_sh), out_shardings=(logits_sh, cache_sh), donate_argnames="cache"
    )
