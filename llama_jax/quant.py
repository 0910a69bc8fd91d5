"""int8 weight-only quantization: per-output-channel scales, dequantized on the fly inside the matmuls.

Every matmul weight (q/k/v/o projections, gate/up/down projections, the untied ``lm_head``) and optionally the
embedding table is stored as int8 ``q`` plus a float ``scale`` with one value per output channel:

    w ~= q * scale,   scale = max|w| / 127 over the contracted (input) axes,   q = round(w / scale) in [-127, 127]

(symmetric "absmax" weight-only quantization, as in LLM.int8()'s vector-wise scheme without outliers,
arXiv:2208.07339 section 3.1). The embedding table [V, D] gets one scale per row (per token), which serves both
its uses (lookup and the tied output head, where a row is an output channel).

A quantized parameter is an ``nnx.Param`` whose value is a :class:`QArray`, a pytree of (``q``, ``scale``);
``param[...]`` returns the dequantized array. The model never dequantizes a whole weight: its products
(:func:`llama_jax.model.project`) multiply activations by ``q`` cast inside the dot and scale the result per
output channel, in either weight layout (llama_jax.model.WEIGHT_LAYOUTS; on CPU the engine stores ``q`` and
``scale`` contracted-axis-last, which XLA:CPU reads as int8 in place). Layer stacking/unstacking, layout changes,
``nnx.split``/``merge``, jit and sharding see the two leaves.

API:
  * :func:`quantize_model` (in place) / :func:`quantize_state`: float -> int8.
  * :func:`abstract_quantized_state`: the quantized abstract parameter tree (ShapeDtypeStructs, with
    shardings when the input has them) -- what the memory planner (``llama_jax.plan``) should use.
  * :func:`save` / :func:`load`: an int8 model in an Orbax checkpoint (``params/<name>.q``, ``params/<name>.scale``
    plus ``quant.json``); :func:`load` also quantizes a float checkpoint at load time.
  * :func:`param_bytes`: bytes held by a model's parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.logs import quiet_orbax
from llama_jax.model import CONTRACTED_AXES

QUANT_MODES = ("none", "int8")
QUANT_FILE = "quant.json"

#: Quantizable parameters (by last path name) -> logical axes reduced by the scale (the contracted input axes):
#: the model's own table, so a weight in either layout (llama_jax.model.WEIGHT_LAYOUTS) quantizes the same.
QUANT_REDUCE: dict[str, tuple[str, ...]] = CONTRACTED_AXES


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """An int8 weight with per-output-channel scales: value = q * scale (broadcast).

    q: int8, the weight's shape. scale: float (the original parameter dtype), the weight's rank with size 1 on the
    reduced (input) axes. ``x[index]`` dequantizes (float, scale's dtype) and indexes.
    """

    q: Any
    scale: Any

    def dequantize(self) -> jax.Array:
        return self.q.astype(self.scale.dtype) * self.scale

    def __getitem__(self, index):
        return self.dequantize()[index]

    @property
    def shape(self):
        return self.q.shape

    @property
    def dtype(self):
        return self.scale.dtype

    @property
    def ndim(self):
        return len(self.q.shape)

    @property
    def size(self):
        return int(np.prod(self.q.shape))


def quantize_array(w: jax.Array, reduce_axes: tuple[int, ...]) -> QArray:
    """Symmetric int8 quantization of ``w`` with one scale per position of the axes not in ``reduce_axes``.

    scale = max|w| / 127 over ``reduce_axes`` (kept as size-1 dims; 1 for an all-zero channel),
    q = round(w / scale) clipped to [-127, 127]. The scale keeps ``w``'s dtype.
    """
    wf = jnp.asarray(w).astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=reduce_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8)
    return QArray(q=q, scale=scale.astype(jnp.asarray(w).dtype))


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def _quant_name(path, embeddings: bool) -> str | None:
    name = next((n for n in reversed(_names(path)) if n in QUANT_REDUCE), None)
    if name == "embedding" and not embeddings:
        return None
    return name


def _reduce_axes(var, name: str) -> tuple[int, ...]:
    axes = tuple(var.get_metadata().get("out_sharding") or ())
    if not axes:
        raise ValueError(f"parameter {name} has no logical axis names (out_sharding metadata); cannot quantize")
    return tuple(i for i, a in enumerate(axes) if a in QUANT_REDUCE[name])


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def quantize_state(state, embeddings: bool = True):
    """int8 :class:`QArray` values for every quantizable parameter of an ``nnx.State`` (others unchanged).

    Already-quantized parameters are left as they are. ``embeddings=False`` keeps the embedding table float.
    """

    def one(path, var):
        name = _quant_name(path, embeddings)
        if name is None or not isinstance(var, nnx.Param) or isinstance(var.get_value(), QArray):
            return var
        return var.replace(quantize_array(var.get_value(), _reduce_axes(var, name)))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def quantize_model(model, embeddings: bool = True):
    """Quantizes a :class:`llama_jax.model.Llama` in place (stacked or unstacked layers) and returns it.

    Weights of the quantizable parameters become int8 + scales (see the module docstring); norms stay float.
    The float arrays are released once nothing else references them.
    """
    state = nnx.state(model, nnx.Param)
    nnx.update(model, quantize_state(state, embeddings))
    return model


def is_quantized(model_or_state) -> bool:
    """True if any parameter holds a :class:`QArray`."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return any(isinstance(v.get_value(), QArray) for v in jax.tree.leaves(state, is_leaf=_is_var) if _is_var(v))


def abstract_quantized_state(state, embeddings: bool = True, mesh=None, rules=None):
    """The quantized counterpart of an abstract parameter state (values ``jax.ShapeDtypeStruct``).

    ``q`` keeps the weight's shape and sharding (int8); ``scale`` has size 1 on the reduced axes, sharded with
    :func:`llama_jax.sharding.named_sharding` over ``mesh`` when one is given (the reduced axes are then
    replicated). This is the tree the memory planner should measure for ``--quant=int8``.
    """

    def one(path, var):
        name = _quant_name(path, embeddings)
        if name is None or not isinstance(var, nnx.Param):
            return var
        sds = var.get_value()
        axes = tuple(var.get_metadata()["out_sharding"])
        red = _reduce_axes(var, name)
        scale_shape = tuple(1 if i in red else n for i, n in enumerate(sds.shape))
        sh = getattr(sds, "sharding", None)
        scale_sh = None
        if mesh is not None:
            from llama_jax import sharding as S

            scale_sh = S.named_sharding(axes, scale_shape, mesh, rules)
        q = jax.ShapeDtypeStruct(sds.shape, jnp.int8, sharding=sh)
        scale = jax.ShapeDtypeStruct(scale_shape, sds.dtype, sharding=scale_sh)
        return var.replace(QArray(q=q, scale=scale))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def param_bytes(model_or_state) -> int:
    """Bytes held by the parameters (int8 q + scales for quantized ones)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------------------------------- storage


def _pure(state) -> dict:
    """nnx.State -> nested dict of arrays; a QArray becomes {"q": ..., "scale": ...}."""
    tree = nnx.to_pure_dict(state)
    return jax.tree.map(
        lambda x: {"q": x.q, "scale": x.scale} if isinstance(x, QArray) else x,
        tree,
        is_leaf=lambda x: isinstance(x, QArray),
    )


def save(path: str | os.PathLike, model, tokenizer_files=(), overwrite: bool = False) -> str:
    """Saves an int8 (or partly int8) model as an Orbax checkpoint that :func:`load` restores without requantizing.

    Layout: the checkpoint of :func:`llama_jax.checkpoint.save` (config.json, tokenizer/, params/) where each
    quantized parameter ``name`` is stored as two arrays ``name.q`` (int8) and ``name.scale``, plus
    ``quant.json`` = {"mode": "int8", "quantized": [names]}. Written atomically. Raises FileExistsError,
    ValueError (the model is not quantized).
    """
    from llama_jax import checkpoint as ckpt

    ocp = ckpt._orbax()
    path = os.path.abspath(os.fspath(path))
    if not is_quantized(model):
        raise ValueError("quant.save: model has no int8 parameters (use llama_jax.checkpoint.save)")
    ckpt._check_new_path(path, overwrite)
    with model.checkpoint_form():  # stacked layers, "in_out" weights (restored afterwards)
        state = nnx.state(model, nnx.Param)
        tree = _pure(state)
        quantized = [
            ".".join(_names(p[:-1])) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0] if _names(p)[-1] == "q"
        ]
        tmp = ckpt._temp_sibling(path)
        try:
            ckpt._copy_tokenizer(tmp, tokenizer_files)
            handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)
            with quiet_orbax(), ocp.Checkpointer(handler) as ckptr:  # no OCDBT-merge note
                ckptr.save(os.path.join(tmp, ckpt.PARAMS_DIR), args=ocp.args.PyTreeSave(tree))
            with open(os.path.join(tmp, QUANT_FILE), "w") as f:
                json.dump({"mode": "int8", "quantized": sorted(quantized)}, f, indent=2)
            ckpt._write_config(tmp, model.config, model.param_dtype)
            ckpt._finish(tmp, path, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def stored_quant(path: str | os.PathLike) -> str:
    """ "int8" if checkpoint ``path`` stores int8 weights (has quant.json), else "none"."""
    f = os.path.join(os.fspath(path), QUANT_FILE)
    if not os.path.isfile(f):
        return "none"
    with open(f) as fh:
        mode = json.load(fh).get("mode")
    if mode not in QUANT_MODES:
        raise ValueError(f"{f}: unknown quantization mode {mode!r} (expected one of {QUANT_MODES})")
    return mode


def load(
    path: str | os.PathLike,
    quant: str = "none",
    dtype=None,
    mesh=None,
    rules: Mapping | None = None,
    embeddings: bool = True,
):
    """Loads checkpoint ``path`` with weights in ``quant`` form.

    Args:
      path: a float checkpoint (:func:`llama_jax.checkpoint.save`) or an int8 one (:func:`save`).
      quant: "none" (float weights; an int8 checkpoint is dequantized) or "int8" (a float checkpoint is
        quantized after loading; an int8 one is restored as stored).
      dtype: float dtype of the scales / float parameters (default :func:`llama_jax.model.default_dtype`).
      mesh, rules: as :func:`llama_jax.checkpoint.load` (q shards like the float weight; scales per
        :func:`abstract_quantized_state`).
      embeddings: quantize the embedding table too (when quantizing a float checkpoint).

    Raises ValueError (unknown ``quant``), and what :func:`llama_jax.checkpoint.load` raises.
    """
    from llama_jax import checkpoint as ckpt
    from llama_jax import sharding as S
    from llama_jax.model import default_dtype

    if quant not in QUANT_MODES:
        raise ValueError(f"--quant must be one of {QUANT_MODES}, got {quant!r}")
    if stored_quant(path) == "none":
        model = ckpt.load(path, dtype=dtype, mesh=mesh, rules=rules)
        return quantize_model(model, embeddings) if quant == "int8" else model

    ocp = ckpt._orbax()
    path = os.path.abspath(os.fspath(path))
    with open(os.path.join(path, QUANT_FILE)) as f:
        stored = set(json.load(f)["quantized"])
    config = ckpt.read_config(path)
    if mesh is not None:
        S.validate(config, mesh, rules)  # the rule of checkpoint.load and sharding.init_sharded
    dtype = jnp.dtype(dtype or default_dtype())
    mesh = mesh or ckpt._default_mesh()
    abstract = ckpt.abstract_model(config, dtype)
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = S.state_shardings(abs_params, mesh, rules)
    abs_params = jax.tree.map(
        lambda v, sh: v.replace(
            jax.ShapeDtypeStruct(
                v.get_value().shape, v.get_value().dtype, sharding=sh.get_value() if _is_var(sh) else sh
            )
        ),
        abs_params,
        shardings,
        is_leaf=_is_var,
    )
    with_emb = "embedder.embedding" in stored
    abs_q = abstract_quantized_state(abs_params, embeddings=with_emb, mesh=mesh, rules=rules)
    names_q = {
        ".".join(_names(p))
        for p, v in jax.tree_util.tree_flatten_with_path(abs_q, is_leaf=_is_var)[0]
        if isinstance(v.get_value(), QArray)
    }
    if names_q != stored:
        raise ValueError(
            f"{os.path.join(path, QUANT_FILE)}: quantized parameters {sorted(stored)} differ from "
            f"the expected {sorted(names_q)}"
        )
    target = _pure(abs_q)

    def restore_arg(leaf):
        return ocp.ArrayRestoreArgs(sharding=leaf.sharding, dtype=leaf.dtype, global_shape=leaf.shape)

    restore_args = jax.tree.map(restore_arg, target)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)
    with ocp.Checkpointer(handler) as ckptr:
        restored = ckptr.restore(
            os.path.join(path, ckpt.PARAMS_DIR), args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )

    def put(p, var):
        node = restored
        for n in _names(p):
            node = node[n]
        if isinstance(node, dict):
            value = QArray(q=node["q"], scale=node["scale"])
            if quant == "none":
                value = value.dequantize()
            return var.replace(value)
        return var.replace(node)

    params = jax.tree_util.tree_map_with_path(put, abs_q, is_leaf=_is_var)
    return nnx.merge(graphdef, params, rest)
