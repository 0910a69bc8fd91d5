"""llama-jax checkpoints: one directory with config.json, Orbax parameters and optional tokenizer files.

Layout of a checkpoint directory ``DIR`` (format version 1)::

    DIR/config.json        LlamaConfig.to_dict() plus {"format_version": 1, "param_dtype": "float32"|...};
                           written LAST, so it doubles as the completion marker
    DIR/params/            an Orbax PyTree checkpoint of ``nnx.state(model, nnx.Param)`` as a pure nested dict,
                           written WITHOUT OCDBT, zarr v2: one zarr array per parameter, in a directory named by
                           its dotted key path (``params/layers.attention.q_proj/``, ``params/embedder.embedding/``)
    DIR/tokenizer/         optional: tokenizer files (tokenizer.model, tokenizer.json, ...), copied verbatim

Why this Orbax layout (no OCDBT, one zarr array per parameter): the stacked decoder weights are [L, ...] arrays,
and a converter streaming a 405B checkpoint must write them one layer at a time. With one plain zarr array per
parameter, :class:`CheckpointWriter` creates each array with tensorstore (the library Orbax itself uses), with
one chunk per layer (chunk shape [1, ...]), writes each layer slice as it is produced, and then writes Orbax's
``_METADATA`` tree file. :func:`load` is then an ordinary Orbax restore, which reads each zarr array straight
into the requested ``jax.sharding.NamedSharding`` (every device reads only its own slice), so nothing is
materialised whole on one host. :func:`save` (a model already in memory) uses Orbax's own writer with the same
options, so both writers produce the same layout (checked by tests/test_checkpoint.py).

Writes are atomic: everything goes to a hidden sibling temporary directory (``.NAME.partial-*``) that is renamed
into place when complete; an interrupted write leaves nothing :func:`load` accepts (no config.json at ``DIR``).

Source: Orbax PyTreeCheckpointHandler (orbax-checkpoint 0.12), tensorstore zarr driver.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.logs import quiet_orbax
from llama_jax.model import Llama, default_dtype
from llama_jax.sharding import MESH_AXES, state_shardings, validate

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


# ---------------------------------------------------------------------------------------------------- helpers


def _orbax():
    import orbax.checkpoint as ocp  # imported lazily: heavy

    return ocp


def _default_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)


def abstract_model(config: LlamaConfig, dtype=None) -> Llama:
    """The model with ``jax.ShapeDtypeStruct`` leaves (no memory allocated), parameters in ``dtype``."""
    dtype = jnp.dtype(dtype or default_dtype())
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), param_dtype=dtype))


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Dotted parameter name -> shape, e.g. ``{"layers.attention.q_proj": (L, D, N, H), ...}``."""
    state = nnx.to_pure_dict(nnx.state(abstract_model(config, jnp.float32), nnx.Param))
    return {".".join(str(k) for k in path): tuple(leaf.shape) for path, leaf in _flatten(state)}


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k in tree:
            yield from _flatten(tree[k], prefix + (k,))
    else:
        yield prefix, tree


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def _check_new_path(path: str, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path}: output already exists (pass overwrite=True / --overwrite to replace it)")


def _temp_sibling(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.partial-", dir=parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(tree: str) -> None:
    """Gives every directory (0o777) and file (0o666) under ``tree`` the mode the user's umask allows, as ``mkdir``
    and ``open`` would have. ``tempfile.mkdtemp`` (0o700) and some writers (safetensors: 0o600) create private
    modes; only call this on a tree this program created."""
    mask = _umask()
    os.chmod(tree, 0o777 & ~mask)
    for root, dirs, files in os.walk(tree):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _finish(tmp: str, path: str, overwrite: bool) -> None:
    """Renames the completed ``tmp`` onto ``path`` (replacing it when ``overwrite``), with umask modes."""
    path = os.path.abspath(path)
    apply_umask(tmp)
    old = None
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path}: output already exists (pass overwrite=True / --overwrite to replace it)")
        old = f"{os.path.dirname(path)}/.{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def _write_config(directory: str, config: LlamaConfig, param_dtype) -> None:
    d = dict(config.to_dict(), format_version=FORMAT_VERSION, param_dtype=_dtype_name(param_dtype))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def _copy_tokenizer(directory: str, tokenizer_files: Iterable[str]) -> None:
    files = [os.fspath(f) for f in tokenizer_files]
    if not files:
        return
    out = os.path.join(directory, TOKENIZER_DIR)
    os.makedirs(out, exist_ok=True)
    for f in files:
        if os.path.isdir(f):
            shutil.copytree(f, out, dirs_exist_ok=True)
        elif os.path.isfile(f):
            shutil.copy2(f, os.path.join(out, os.path.basename(f)))
        else:
            raise FileNotFoundError(f"{f}: tokenizer file not found")


# ---------------------------------------------------------------------------------------------------- public API


def save(
    path: str | os.PathLike, model: Llama, tokenizer_files: Iterable[str | os.PathLike] = (), overwrite: bool = False
) -> str:
    """Saves ``model`` (config + parameters in their dtype) and copies ``tokenizer_files`` into ``path``/tokenizer.

    Args:
      path: output directory; written atomically (temporary sibling renamed into place).
      model: a :class:`llama_jax.model.Llama` (stacked or unstacked layers, either weight layout; stored stacked,
        "in_out"), any sharding.
      tokenizer_files: files (or directories whose contents are copied) to store under ``tokenizer/``.
      overwrite: replace an existing ``path``.

    Returns the absolute path. Raises FileExistsError (``path`` exists, no ``overwrite``), FileNotFoundError
    (a tokenizer file is missing).
    """
    path = os.path.abspath(os.fspath(path))
    _check_new_path(path, overwrite)
    with model.checkpoint_form():  # stacked [L, ...] arrays, "in_out" weights; restored afterwards
        return _save(path, nnx.to_pure_dict(nnx.state(model, nnx.Param)), model, tokenizer_files, overwrite)


def _save(path, state, model, tokenizer_files, overwrite) -> str:
    ocp = _orbax()
    if jax.process_count() > 1:
        return _save_multihost(path, state, model, tokenizer_files, overwrite)
    tmp = _temp_sibling(path)
    try:
        _copy_tokenizer(tmp, tokenizer_files)
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)
        with quiet_orbax(), ocp.Checkpointer(handler) as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(state))
        _write_config(tmp, model.config, model.param_dtype)
        _finish(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _save_multihost(path, state, model, tokenizer_files, overwrite) -> str:
    """:func:`save` when several processes hold the arrays (``jax.distributed``).

    Every process writes its own shards through Orbax into one temporary directory whose name all processes agree
    on; process 0 alone copies tokenizer files, writes config.json (the completion marker) and renames the
    directory into place, between barriers. The path must be on a file system all processes share.
    """
    from jax.experimental import multihost_utils

    ocp = _orbax()
    primary = jax.process_index() == 0
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-multihost")
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _copy_tokenizer(tmp, tokenizer_files)
    multihost_utils.sync_global_devices(f"llama_jax.save:start:{path}")
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)
    with quiet_orbax(), ocp.Checkpointer(handler) as ckptr:
        ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(state))
    multihost_utils.sync_global_devices(f"llama_jax.save:written:{path}")
    if primary:
        _write_config(tmp, model.config, model.param_dtype)
        _finish(tmp, path, overwrite)
    multihost_utils.sync_global_devices(f"llama_jax.save:done:{path}")
    return path


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """The :class:`LlamaConfig` of checkpoint ``path``.

    Raises FileNotFoundError naming the missing directory / config.json (also for an incomplete write, which has
    no config.json), ValueError for an invalid config or an unknown format version.
    """
    return LlamaConfig.from_dict(_read_meta(path)[0])


def stored_dtype(path: str | os.PathLike) -> jnp.dtype:
    """The parameter dtype the checkpoint was written in."""
    return jnp.dtype(_read_meta(path)[1])


def _read_meta(path) -> tuple[dict, str]:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file}: missing (not a llama-jax checkpoint, or an interrupted write)")
    try:
        with open(cfg_file) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    version = d.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    dtype = d.pop("param_dtype", "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{cfg_file}: param_dtype {dtype!r} is not one of float32, bfloat16, float16")
    return d, dtype


def tokenizer_dir(path: str | os.PathLike) -> str | None:
    """``path``/tokenizer if the checkpoint stores tokenizer files, else None."""
    d = os.path.join(os.fspath(path), TOKENIZER_DIR)
    return d if os.path.isdir(d) and os.listdir(d) else None


def _subtree(tree: Mapping, paths: Sequence[tuple]) -> dict:
    """The nested dict holding only the leaves of ``tree`` at ``paths``."""
    out: dict = {}
    for names in paths:
        src, dst = tree, out
        for n in names[:-1]:
            src, dst = src[n], dst.setdefault(n, {})
        dst[names[-1]] = src[names[-1]]
    return out


def _merge_into(dst: dict, src: Mapping) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping):
            _merge_into(dst.setdefault(k, {}), v)
        else:
            dst[k] = v


def restore_in_groups(ckptr, params_dir: str, target: Mapping, restore_args: Mapping, itemsize: int) -> dict:
    """Orbax-restores the nested-dict tree ``target`` (abstract leaves with ``.shape``) a group of arrays at a time.

    One ``PyTreeRestore`` of the whole tree reads every array concurrently, so all of tensorstore's host read
    buffers exist next to the device arrays they fill: a load peaked at 2.1-2.7x the weight bytes (SmolLM2
    float32: 1.15-1.43 GB of RSS for 538 MB of weights). Restoring groups of at most
    max(largest array, total / ``RESTORE_GROUPS``) bytes (``partial_restore``) bounds the host overhead to one
    group: 870 MB for the same load. At most ``RESTORE_GROUPS`` + 1 restore calls, so a 405B load stays parallel
    within each group. ``itemsize``: bytes per element of the restored dtype. Raises what Orbax raises.
    """
    flat = [(names, math.prod(leaf.shape) * itemsize) for names, leaf in _flatten(target)]
    budget = max(max((b for _, b in flat), default=0), sum(b for _, b in flat) // RESTORE_GROUPS)
    groups: list[list[tuple]] = [[]]
    used = 0
    for names, nbytes in flat:
        if groups[-1] and used + nbytes > budget:
            groups.append([])
            used = 0
        groups[-1].append(names)
        used += nbytes
    restored: dict = {}
    for paths in groups:
        args = _orbax().args.PyTreeRestore(
            item=_subtree(target, paths), restore_args=_subtree(restore_args, paths), partial_restore=True
        )
        _merge_into(restored, ckptr.restore(params_dir, args=args))
    return restored


RESTORE_GROUPS = 8


def load(
    path: str | os.PathLike, dtype=None, mesh: jax.sharding.Mesh | None = None, rules: Mapping | None = None
) -> Llama:
    """Restores a :class:`Llama` from checkpoint ``path`` straight into (sharded) device arrays.

    The abstract model is built with ``nnx.eval_shape``; target shardings come from
    :func:`llama_jax.sharding.state_shardings` (``mesh``, ``rules``); Orbax/tensorstore reads each device's slice
    of each parameter directly into that sharding, casting to ``dtype``.

    Args:
      path: a directory written by :func:`save` or by the conversion tool.
      dtype: parameter dtype; None -> :func:`llama_jax.model.default_dtype` (float32 on CPU, bfloat16 else).
      mesh: device mesh with axes ``llama_jax.sharding.MESH_AXES``; None -> the first device alone. Checked with
        :func:`llama_jax.sharding.validate`, the same rule as :func:`llama_jax.sharding.init_sharded`.
      rules: logical-axis rules (default ``llama_jax.sharding.DEFAULT_RULES``).

    Raises:
      FileNotFoundError: the directory, its config.json or params/ (or a parameter array) is missing, named.
      ValueError: invalid config.json, or stored parameter shapes that disagree with it (parameter named), or a
        mesh axis that does not divide the dimension it shards (e.g. ``tensor=4`` and 9 query heads: the message
        names the mesh axis, the logical axis and the config field).
    """
    ocp = _orbax()
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(path, "quant.json")):  # int8 weights stored by llama_jax.quant.save
        from llama_jax import quant

        return quant.load(path, quant=quant.stored_quant(path), dtype=dtype, mesh=mesh, rules=rules)
    config = read_config(path)
    if mesh is not None:
        validate(config, mesh, rules)
    params_dir = os.path.join(path, PARAMS_DIR)
    meta_file = os.path.join(params_dir, "_METADATA")
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f"{meta_file}: missing (incomplete checkpoint)")
    dtype = jnp.dtype(dtype or default_dtype())
    mesh = mesh or _default_mesh()

    abstract = abstract_model(config, dtype)
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = state_shardings(abs_params, mesh, rules)
    target = nnx.to_pure_dict(abs_params)
    sharding_tree = nnx.to_pure_dict(shardings)
    for names, leaf in _flatten(target):
        array_dir = os.path.join(params_dir, ".".join(str(n) for n in names))
        zarray = os.path.join(array_dir, ".zarray")
        if not os.path.isfile(zarray):
            raise FileNotFoundError(f"{array_dir}: parameter array missing (incomplete checkpoint)")
        with open(zarray) as f:
            stored = tuple(json.load(f)["shape"])
        if stored != tuple(leaf.shape):
            raise ValueError(
                f"{array_dir}: stored shape {stored} != {tuple(leaf.shape)} expected from "
                f"{os.path.join(path, CONFIG_FILE)}"
            )
    restore_args = jax.tree.map(
        lambda leaf, sh: ocp.ArrayRestoreArgs(sharding=sh, dtype=dtype, global_shape=leaf.shape), target, sharding_tree
    )
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)
    with ocp.Checkpointer(handler) as ckptr:
        restored = restore_in_groups(ckptr, params_dir, target, restore_args, jnp.dtype(dtype).itemsize)
    nnx.replace_by_pure_dict(abs_params, restored)
    return nnx.merge(graphdef, abs_params, rest)


# ---------------------------------------------------------------------------------------------------- streaming


class CheckpointWriter:
    """Writes a checkpoint parameter by parameter and layer by layer (bounded memory; used by ``conversions``).

    Usage::

        with CheckpointWriter(out_dir, config, dtype=jnp.bfloat16, overwrite=False) as w:
            w.write("embedder.embedding", emb)                       # [V, D]
            for i in range(config.n_layers):
                w.write("layers.attention.q_proj", q_i, layer=i)     # [D, N, H] slice of [L, D, N, H]
                ...
            w.commit(tokenizer_files=[...])

    Each parameter is a tensorstore zarr v2 array with one chunk per layer for stacked weights; values are cast
    to ``dtype`` as written. ``commit`` checks every parameter (every layer) was written, writes Orbax's
    ``_METADATA`` for the tree, config.json last, and renames the temporary directory into place. Leaving the
    ``with`` block by an exception (or without ``commit``) deletes the temporary directory.

    Raises FileExistsError (``path`` exists, no ``overwrite``) at construction; KeyError / ValueError naming the
    parameter for an unknown name or a wrong shape; ValueError at commit naming what was never written.
    """

    def __init__(self, path: str | os.PathLike, config: LlamaConfig, dtype=jnp.float32, overwrite: bool = False):
        import tensorstore as ts

        self.path = os.path.abspath(os.fspath(path))
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.overwrite = overwrite
        _check_new_path(self.path, overwrite)
        self.shapes = param_shapes(config)
        self.tmp = _temp_sibling(self.path)
        self._params = os.path.join(self.tmp, PARAMS_DIR)
        os.makedirs(self._params)
        zdtype = "bfloat16" if self.dtype == jnp.bfloat16 else np.dtype(self.dtype).str
        self._arrays, self._written = {}, {}
        futures = []
        for name, shape in self.shapes.items():
            stacked = name.startswith("layers.")
            chunks = (1,) + shape[1:] if stacked else shape
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": os.path.join(self._params, name)},
                "metadata": {
                    "shape": list(shape),
                    "chunks": list(chunks),
                    "dtype": zdtype,
                    "compressor": None,
                    "fill_value": None,
                    "order": "C",
                    "dimension_separator": ".",
                },
                "create": True,
                "delete_existing": True,
            }
            futures.append((name, ts.open(spec)))
            self._written[name] = set()
        for name, fut in futures:
            self._arrays[name] = fut.result()
        self._done = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._done:
            self.abort()
        return False

    def abort(self) -> None:
        """Deletes the temporary directory (nothing is left at ``path``)."""
        self._arrays = {}
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def write(self, name: str, value, layer: int | None = None) -> None:
        """Writes parameter ``name`` (dotted, e.g. ``layers.mlp.up_proj``), or its slice ``layer`` if stacked."""
        if name not in self._arrays:
            raise KeyError(f"unknown parameter {name!r} (known: {', '.join(self.shapes)})")
        shape = self.shapes[name]
        stacked = name.startswith("layers.")
        if stacked != (layer is not None):
            raise ValueError(f"{name}: layer index {'required' if stacked else 'not allowed'}")
        expect = shape[1:] if stacked else shape
        value = np.asarray(value)
        if tuple(value.shape) != tuple(expect):
            raise ValueError(f"{name}: got shape {tuple(value.shape)}, expected {tuple(expect)}")
        if value.dtype != self.dtype:
            value = value.astype(self.dtype)
        arr = self._arrays[name]
        if stacked:
            if not 0 <= layer < shape[0]:
                raise ValueError(f"{name}: layer {layer} out of range [0, {shape[0]})")
            arr[layer].write(value).result()
            self._written[name].add(layer)
        else:
            arr.write(value).result()
            self._written[name].add(None)

    def commit(self, tokenizer_files: Iterable[str | os.PathLike] = ()) -> str:
        """Finishes the checkpoint (see class docstring); returns its path."""
        missing = []
        for name, shape in self.shapes.items():
            want = set(range(shape[0])) if name.startswith("layers.") else {None}
            lack = want - self._written[name]
            if lack:
                missing.append(name if None in lack else f"{name} (layers {sorted(lack)[:5]}...)")
        if missing:
            raise ValueError(f"checkpoint incomplete, never written: {', '.join(missing)}")
        tree_metadata = {}
        for name, shape in self.shapes.items():
            keys = name.split(".")
            tree_metadata[str(tuple(keys))] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in keys],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)},
            }
        with open(os.path.join(self._params, "_METADATA"), "w") as f:
            json.dump(
                {
                    "tree_metadata": tree_metadata,
                    "use_ocdbt": False,
                    "use_zarr3": False,
                    "store_array_data_equal_to_fill_value": True,
                    "custom_metadata": None,
                },
                f,
            )
        self._arrays = {}
        _copy_tokenizer(self.tmp, tokenizer_files)
        _write_config(self.tmp, self.config, self.dtype)
        try:
            _finish(self.tmp, self.path, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path


def read_param(path: str | os.PathLike, name: str, layer: int | None = None) -> np.ndarray:
    """Host numpy copy of stored parameter ``name`` (dotted, e.g. ``layers.mlp.up_proj``), or of one ``layer``
    slice of a stacked parameter, read with tensorstore without loading anything else (used by exporters).

    Raises FileNotFoundError naming the missing parameter array.
    """
    import tensorstore as ts

    array_dir = os.path.join(os.fspath(path), PARAMS_DIR, name)
    if not os.path.isfile(os.path.join(array_dir, ".zarray")):
        raise FileNotFoundError(f"{array_dir}: parameter array missing")
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": array_dir}, "open": True}).result()
    if layer is not None:
        arr = arr[layer]
    return np.asarray(arr.read().result())


def check_arrays(path: str | os.PathLike) -> None:
    """Checks, before any read, that every parameter array of checkpoint ``path`` has a readable zarr ``.zarray``
    and all of its chunk files (an interrupted copy or a deleted file otherwise surfaces as an Orbax traceback
    from a background thread).

    Raises:
      FileNotFoundError: no ``params/`` directory, or a missing chunk file (named).
      ValueError: a malformed ``.zarray`` (named).
    """
    params = os.path.join(os.fspath(path), PARAMS_DIR)
    if not os.path.isdir(params):
        raise FileNotFoundError(f"{params}: missing (not a llama-jax checkpoint, or an interrupted write)")
    for name in sorted(os.listdir(params)):
        zarray = os.path.join(params, name, ".zarray")
        if not os.path.isfile(zarray):
            continue
        try:
            with open(zarray) as f:
                meta = json.load(f)
            shape, chunks = [int(n) for n in meta["shape"]], [int(n) for n in meta["chunks"]]
            sep = meta.get("dimension_separator", ".")
            if len(shape) != len(chunks) or any(c < 1 for c in chunks) or sep not in (".", "/"):
                raise ValueError("shape and chunks disagree")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{zarray}: malformed zarr array metadata ({e})") from None
        grid = [-(-s // c) for s, c in zip(shape, chunks, strict=True)]
        for index in np.ndindex(*grid) if grid else [()]:
            key = sep.join(str(i) for i in index) if index else "0"
            if not os.path.isfile(os.path.join(params, name, key)):
                raise FileNotFoundError(
                    f"{os.path.join(params, name, key)}: chunk file of parameter {name} is "
                    "missing (damaged or incomplete checkpoint)"
                )
