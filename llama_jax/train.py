"""Fine-tuning: next-token cross-entropy, Optax AdamW, LoRA, one jitted (sharded) train step, Orbax checkpoints.

Pieces (each usable alone):

  cross_entropy_sums(logits, targets, mask)   summed masked token cross-entropy and the token count
  chunked_cross_entropy_sums(model, hidden, targets, mask, chunk)
                                              the same from final hidden states, ``chunk`` positions at a time:
                                              the [B, T, V] float32 logits and softmax never exist at once
  make_optimizer(cfg, params)                 clip_by_global_norm -> AdamW (warmup + cosine schedule, weight decay
                                              optionally sparing norms and embeddings)
  init_lora / apply_lora / merge_lora         LoRA on chosen projections (Hu et al. 2021, arXiv:2106.09685)
  Trainer(model, cfg, mesh=None)              the train state and ONE ``jax.jit``-ted step (gradient accumulation
                                              by ``lax.scan`` over micro-batches inside it)
  Checkpointer(directory, ...)                Orbax ``CheckpointManager``: every N steps, keep K, asynchronous
  fit(trainer, loader, steps, ...)            the loop: resume, metrics JSONL (nothing lost or duplicated after a
                                              resume), SIGTERM -> final save

Mixed precision: master weights (and Adam moments) are float32; ``TrainConfig.compute_dtype`` (default: bfloat16
on accelerators, float32 on CPU) is the activation dtype; the model casts each weight to it at use
(``llama_jax.model``), so the gradients arrive in float32.

Batches are dicts of arrays [A, B, T] (A micro-batches of B rows of T tokens) with the keys of
:data:`llama_jax.data.BATCH_KEYS`. The loss of a step is the token-weighted mean over all A*B*T targets, so
gradient accumulation gives the same update as one batch of A*B rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import sharding as sharding_lib

LORA_TARGETS = {  # name -> (path in the parameter tree, number of leading input dims after the layers axis)
    "q_proj": (("layers", "attention", "q_proj"), 1),
    "k_proj": (("layers", "attention", "k_proj"), 1),
    "v_proj": (("layers", "attention", "v_proj"), 1),
    "o_proj": (("layers", "attention", "o_proj"), 2),
    "gate_proj": (("layers", "mlp", "gate_proj"), 1),
    "up_proj": (("layers", "mlp", "up_proj"), 1),
    "down_proj": (("layers", "mlp", "down_proj"), 1),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a fine-tuning run.

    Attributes:
      learning_rate: peak learning rate (after linear warmup from 0).
      warmup_steps: linear warmup steps.
      total_steps: length of the schedule; cosine decay from the peak to ``learning_rate * end_lr_ratio``.
      end_lr_ratio: final / peak learning rate.
      b1, b2, eps: Adam moments (Loshchilov & Hutter 2019, AdamW).
      weight_decay: decoupled weight decay coefficient.
      decay_norms_and_embeddings: when False, RMSNorm scales, the token embedding and the output head are not
        decayed.
      clip_norm: clip gradients to this global L2 norm (None: no clipping).
      grad_accum: micro-batches per optimizer step (batches are [grad_accum, B, T]).
      remat: rematerialisation policy of the scanned layers: "full" (default: each layer's activations are
        recomputed in the backward pass, only its input is kept: SmolLM2-135M's step at batch 8 x 512 needs 2.8 GiB
        of XLA buffers instead of 14.3 GiB with None), "dots"
        (keep matmul outputs) or None (keep everything; fastest, most memory). See ``llama_jax.model``.
      loss_chunk: sequence positions whose logits are computed at once by the loss
        (:func:`chunked_cross_entropy_sums`); 0: the whole sequence (materialises [B, T, V] float32 logits).
      compute_dtype: activation dtype ("float32", "bfloat16"); None: bfloat16 on accelerators, float32 on CPU.
      lora_rank: 0 for full fine-tuning, else the LoRA rank r.
      lora_alpha: LoRA scale numerator (the update is (alpha / r) A @ B).
      lora_targets: projections that get LoRA (keys of :data:`LORA_TARGETS`).
      seed: initialisation of LoRA A and the step RNG.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_norms_and_embeddings: bool = False
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    remat: str | None = "full"
    loss_chunk: int = 128
    compute_dtype: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = ("q_proj", "v_proj")
    seed: int = 0

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0, got {self.loss_chunk}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"lora_targets: unknown projection(s) {bad}; known: {sorted(LORA_TARGETS)}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------- loss
def cross_entropy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy.

    Args:
      logits: float [B, T, V] (computed in float32).
      targets: int32 [B, T], the token each position predicts.
      mask: float or bool [B, T], the weight of each target (0 = not counted).

    Returns:
      (sum over positions of mask * -log p(target), sum of mask), both float32 scalars. The mean loss is their
      ratio; keeping sums makes gradient accumulation exact.
    """
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def chunked_cross_entropy_sums(
    model, hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int = 128
) -> tuple[jax.Array, jax.Array]:
    """:func:`cross_entropy_sums` of ``model.logits(hidden)`` computed ``chunk`` sequence positions at a time.

    Each chunk's float32 logits [B, chunk, V] and softmax are made inside ``jax.checkpoint`` under a ``lax.scan``,
    so the forward pass keeps only the running sum and the backward pass recomputes one chunk's logits at a time:
    peak memory for the loss is about B * chunk * V * 4 bytes (x2 for the softmax gradient) instead of
    B * T * V * 4 (Liger-Kernel's fused linear cross-entropy, arXiv:2410.10989, does the same on GPU).
    The result equals :func:`cross_entropy_sums` up to float32 summation order.

    Args:
      model: a :class:`llama_jax.model.Llama` (its ``logits`` maps [B, c, D] -> float32 [B, c, V]).
      hidden: final-normed hidden states [B, T, D] (``model(..., return_hidden=True)``).
      targets: int32 [B, T]; mask: float or bool [B, T] as in :func:`cross_entropy_sums`.
      chunk: positions per chunk (> 0; T is padded with masked positions to a multiple); 0 or >= T: one chunk.
    Returns: (sum of mask * NLL, sum of mask), float32 scalars.
    """
    b, t, d = hidden.shape
    mask = mask.astype(jnp.float32)
    c = t if chunk <= 0 else min(chunk, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask_p = jnp.pad(mask, ((0, 0), (0, pad)))
    else:
        mask_p = mask
    xs = (
        hidden.reshape(b, n, c, d).swapaxes(0, 1),  # [n, B, c, D]
        targets.reshape(b, n, c).swapaxes(0, 1),
        mask_p.reshape(b, n, c).swapaxes(0, 1),
    )

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_sum(x, tgt, m):
        logits = model.logits(x).astype(jnp.float32)  # [B, c, V]
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, tgt) * m)

    def body(total, chunk_xs):
        return total + chunk_sum(*chunk_xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0), xs)
    return total, jnp.sum(mask)


def _forward(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    return model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])


def _forward_sums(graphdef, params, batch, chunk: int = 128):
    """(summed masked NLL, token count) of one [B, T] batch, the loss computed ``chunk`` positions at a time."""
    model = nnx.merge(graphdef, params)
    hidden = model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True)
    return chunked_cross_entropy_sums(model, hidden, batch["targets"], batch["loss_mask"], chunk)


def loss_fn(graphdef, params, batch, chunk: int = 128) -> jax.Array:
    """Mean masked cross-entropy of one [B, T] batch for the model ``nnx.merge(graphdef, params)`` (logits made
    ``chunk`` positions at a time, see :func:`chunked_cross_entropy_sums`)."""
    s, n = _forward_sums(graphdef, params, batch, chunk)
    return s / jnp.maximum(n, 1.0)


def _path_names(path) -> tuple[str, ...]:
    """Key path -> names (dict keys, attribute names, sequence indices as strings)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def weight_decay_mask(params, decay_norms_and_embeddings: bool):
    """Bool pytree like ``params``: True where weight decay applies."""

    def one(path, _):
        names = _path_names(path)
        if decay_norms_and_embeddings:
            return True
        return not (names[-1] == "scale" or names[-1] in ("embedding", "lm_head"))

    return jax.tree_util.tree_map_with_path(one, params)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup 0 -> peak over ``warmup_steps``, cosine decay to ``peak * end_lr_ratio`` at ``total_steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(schedule, b1, b2, eps, weight_decay, mask)."""
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            lr_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=weight_decay_mask(params, cfg.decay_norms_and_embeddings),
        )
    )
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------------- LoRA
def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def init_lora(params: Mapping, targets: Sequence[str], rank: int, key: jax.Array) -> dict:
    """LoRA factors for the stacked projections ``targets`` of a pure-dict parameter tree.

    For a base weight W [L, *in, *out] (e.g. q_proj [L, D, N, H]: in = (D,), out = (N, H); o_proj [L, N, H, D]:
    in = (N, H), out = (D,)), returns {name: {"a": [L, prod(in), r], "b": [L, r, prod(out)]}} in float32, A
    ~ N(0, 1/prod(in)), B = 0 (so the adapted model starts equal to the base; LoRA paper section 4.1).

    Raises:
      ValueError: an unknown target, or a tree without stacked layers.
    """
    out = {}
    for i, name in enumerate(targets):
        if name not in LORA_TARGETS:
            raise ValueError(f"unknown LoRA target {name!r}; known: {sorted(LORA_TARGETS)}")
        path, n_in = LORA_TARGETS[name]
        try:
            w = _get(params, path)
        except (KeyError, TypeError):
            raise ValueError(
                f"LoRA target {name!r}: parameter {'.'.join(path)} not found (stacked layers needed)"
            ) from None
        n_layers, fan_in = w.shape[0], int(np.prod(w.shape[1 : 1 + n_in]))
        fan_out = int(np.prod(w.shape[1 + n_in :]))
        a = jax.random.normal(jax.random.fold_in(key, i), (n_layers, fan_in, rank), jnp.float32) / np.sqrt(fan_in)
        out[name] = {"a": a, "b": jnp.zeros((n_layers, rank, fan_out), jnp.float32)}
    return out


def lora_delta(w_shape, a: jax.Array, b: jax.Array, alpha: float) -> jax.Array:
    """(alpha / r) A @ B per layer, reshaped to the base weight's shape. a [L, I, r], b [L, r, O]."""
    rank = a.shape[-1]
    return (jnp.einsum("LIR,LRO->LIO", a, b) * (alpha / rank)).reshape(w_shape)


def apply_lora(params: Mapping, lora: Mapping, alpha: float) -> dict:
    """The effective parameter tree: W + (alpha / r) A @ B for every LoRA target (others unchanged).

    Memory trade-off: the effective weight of each target is materialised (one extra weight-sized array per
    target, plus its gradient in the backward pass, per step) instead of adding an x @ A @ B side path inside the
    model; in exchange the base weights get no gradient kept across steps and no optimizer state (AdamW's two
    float32 moments exist only for A and B), which is where full fine-tuning spends 2x-3x the weight memory.
    """
    out = _deep_copy_dicts(params)
    for name, ab in lora.items():
        path, _ = LORA_TARGETS[name]
        parent = _get(out, path[:-1])
        w = parent[path[-1]]
        parent[path[-1]] = w + lora_delta(w.shape, ab["a"], ab["b"], alpha).astype(w.dtype)
    return out


def merge_lora(params: Mapping, lora: Mapping, alpha: float) -> dict:
    """Folds LoRA into the base weights for export (same as :func:`apply_lora`, outside the training step)."""
    return apply_lora(params, lora, alpha)


def _deep_copy_dicts(tree):
    if isinstance(tree, Mapping):
        return {k: _deep_copy_dicts(v) for k, v in tree.items()}
    return tree


# ---------------------------------------------------------------------------------------------------- trainer
def _replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


class Trainer:
    """Train state and the jitted step for full or LoRA fine-tuning of a :class:`llama_jax.model.Llama`.

    Args:
      model: the model (its parameters are the starting point; stacked layers). Its ``remat`` and ``dtype``
        are set from ``cfg``.
      cfg: :class:`TrainConfig`.
      mesh: optional ``jax.sharding.Mesh``; parameters (and their Adam moments) are then sharded by
        ``llama_jax.sharding.state_shardings`` with ``rules`` (FSDP / tensor parallel), batches over
        ("data", "fsdp"), LoRA factors replicated.
      rules: the logical-axis rules table (default ``llama_jax.sharding.DEFAULT_RULES``).

    Attributes:
      state: {"params": trainable pure-dict tree (all parameters, or the LoRA factors), "opt_state",
        "step": int32, "rng": uint32 [2]}.
      base: the frozen base parameters (LoRA) or None (full fine-tuning).
    """

    def __init__(self, model, cfg: TrainConfig, *, mesh=None, rules=None):
        self.cfg, self.mesh, self.rules = cfg, mesh, rules
        self.config = model.config
        model.remat = cfg.remat
        if cfg.compute_dtype is not None:
            model.dtype = jnp.dtype(cfg.compute_dtype)
        elif jax.default_backend() != "cpu":
            model.dtype = jnp.dtype(jnp.bfloat16)
        graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError("the model has non-parameter state; the trainer handles nnx.Param only")
        self.graphdef = graphdef
        params = nnx.to_pure_dict(param_state)
        params = jax.tree.map(
            lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )  # float32 master weights
        if mesh is not None:
            shard = nnx.to_pure_dict(sharding_lib.state_shardings(param_state, mesh, rules))
            self.param_shardings = shard
            params = jax.device_put(params, shard)
        else:
            self.param_shardings = None
        key = jax.random.PRNGKey(cfg.seed)
        self.lora = cfg.lora_rank > 0
        if self.lora:
            self.base = params
            trainable = init_lora(params, cfg.lora_targets, cfg.lora_rank, jax.random.fold_in(key, 1))
            if mesh is not None:
                trainable = jax.device_put(trainable, _replicated(mesh))
            trainable_shardings = None if mesh is None else jax.tree.map(lambda _: _replicated(mesh), trainable)
        else:
            self.base = None
            trainable = params
            trainable_shardings = self.param_shardings
        self.tx = make_optimizer(cfg, trainable)
        self.schedule = lr_schedule(cfg)
        if mesh is None:
            opt_state = self.tx.init(trainable)
            self.state_shardings = None
        else:
            abstract = jax.eval_shape(self.tx.init, trainable)
            opt_shardings = optax.tree_map_params(
                self.tx, lambda _, s: s, abstract, trainable_shardings, transform_non_params=lambda _: _replicated(mesh)
            )
            opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(trainable)
            self.state_shardings = {
                "params": trainable_shardings,
                "opt_state": opt_shardings,
                "step": _replicated(mesh),
                "rng": _replicated(mesh),
            }
        self.state = {"params": trainable, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32), "rng": key}
        if mesh is not None:
            self.state = jax.device_put(self.state, self.state_shardings)
        self._compiled = None  # (batch shapes, jax.stages.Compiled) from compile_step
        self._build_step()

    # -------------------------------------------------------------- the step
    def effective_params(self, trainable=None):
        """The parameters the model runs with (LoRA folded in when LoRA is on)."""
        trainable = self.state["params"] if trainable is None else trainable
        return apply_lora(self.base, trainable, self.cfg.lora_alpha) if self.lora else trainable

    def _batch_sharding(self, ndim: int):
        if self.mesh is None:
            return None
        axes = (None,) * (ndim - 2) + ("batch", "length")
        return lambda shape: NamedSharding(self.mesh, sharding_lib.logical_to_spec(axes, shape, self.mesh, self.rules))

    def _build_step(self):
        graphdef, tx, schedule, alpha, lora = self.graphdef, self.tx, self.schedule, self.cfg.lora_alpha, self.lora
        chunk = self.cfg.loss_chunk

        def micro(trainable, base, mb):
            params = apply_lora(base, trainable, alpha) if lora else trainable
            return _forward_sums(graphdef, params, mb, chunk)

        grad_fn = jax.value_and_grad(micro, has_aux=True)

        def step(state, base, batch):
            trainable = state["params"]

            def body(carry, mb):
                g_acc, s_acc, n_acc = carry
                (s, n), g = grad_fn(trainable, base, mb)
                return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            (g, s, n), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), batch)
            denom = jnp.maximum(n, 1.0)
            g = jax.tree.map(lambda x: x / denom, g)
            updates, opt_state = tx.update(g, state["opt_state"], trainable)
            params = optax.apply_updates(trainable, updates)
            metrics = {"loss": s / denom, "tokens": n, "grad_norm": optax.tree.norm(g), "lr": schedule(state["step"])}
            rng = jax.random.split(state["rng"])[0]
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}, metrics

        def eval_sums(trainable, base, batch):
            def body(carry, mb):
                s, n = micro(trainable, base, mb)
                return (carry[0] + s, carry[1] + n), None

            (s, n), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), batch)
            return s, n

        if self.mesh is None:
            self._step = jax.jit(step, donate_argnums=0)
            self._eval = jax.jit(eval_sums)
        else:
            base_sh = self.param_shardings if lora else None
            rep = _replicated(self.mesh)
            metric_sh = {"loss": rep, "tokens": rep, "grad_norm": rep, "lr": rep}
            self._step = jax.jit(
                step,
                in_shardings=(self.state_shardings, base_sh, None),
                out_shardings=(self.state_shardings, metric_sh),
                donate_argnums=0,
            )
            self._eval = jax.jit(
                eval_sums, in_shardings=(self.state_shardings["params"], base_sh, None), out_shardings=(rep, rep)
            )

    def _put_batch(self, batch: Mapping[str, np.ndarray]):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        if batch["tokens"].ndim == 2:
            batch = {k: v[None] for k, v in batch.items()}
        if self.mesh is not None:
            batch = {
                k: jax.device_put(
                    v,
                    NamedSharding(
                        self.mesh,
                        sharding_lib.logical_to_spec((None, "batch", "length"), v.shape, self.mesh, self.rules),
                    ),
                )
                for k, v in batch.items()
            }
        return batch

    @staticmethod
    def _shapes(batch) -> tuple:
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))

    def compile_step(self, batch: Mapping[str, np.ndarray]):
        """Compiles the train step ahead of time for batches shaped like ``batch`` ([A, B, T] or [B, T]) and keeps
        it (:meth:`train_step` then runs it). Returns the ``jax.stages.Compiled`` (its ``memory_analysis()`` gives
        XLA's buffer sizes; the train state and optimizer state are donated: input/output aliased)."""
        batch = self._put_batch(batch)
        compiled = self._step.lower(self.state, self.base, batch).compile()
        self._compiled = (self._shapes(batch), compiled)
        return compiled

    def train_step(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on a batch [A, B, T] (or [B, T]); returns host floats loss, tokens, grad_norm, lr.

        The previous train state's buffers are donated to the step (deleted after it): hold no references to
        ``trainer.state`` arrays across a step."""
        batch = self._put_batch(batch)
        compiled = self._compiled
        step = compiled[1] if compiled is not None and compiled[0] == self._shapes(batch) else self._step
        self.state, metrics = step(self.state, self.base, batch)
        return {k: float(v) for k, v in metrics.items()}

    def eval_sums(self, batch: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """(summed NLL, token count) of a batch [A, B, T] or [B, T] under the current parameters."""
        s, n = self._eval(self.state["params"], self.base, self._put_batch(batch))
        return float(s), float(n)

    def step_count(self) -> int:
        return int(self.state["step"])

    def export_params(self) -> dict:
        """The full parameter tree (LoRA merged) as a pure dict, float32."""
        return jax.device_get(self.effective_params())

    def export_model(self, param_dtype=None):
        """A :class:`llama_jax.model.Llama` holding :meth:`export_params` (cast to ``param_dtype`` when given)."""
        params = self.export_params()
        if param_dtype is not None:
            params = jax.tree.map(lambda x: np.asarray(x).astype(param_dtype), params)
        model = nnx.merge(self.graphdef, jax.tree.map(jnp.asarray, params))
        model.remat = None
        model.param_dtype = jnp.dtype(param_dtype or jnp.float32)
        return model


def host_random_model(config, seed: int = 0, std: float = 0.02, **model_kwargs):
    """A :class:`llama_jax.model.Llama` with N(0, std) weights (norm scales 1) drawn by numpy on the host.

    Same distribution as the model's own initialiser but no XLA compilation per parameter shape (seconds each
    on a loaded CPU), for tests and smoke runs. ``model_kwargs`` go to ``Llama`` (param_dtype, remat, ...).
    """
    from llama_jax.model import Llama

    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), **model_kwargs))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if _path_names(path)[-1] == "scale":
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray((std * rng.standard_normal(x.shape)).astype(np.float32), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))


# ---------------------------------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """Orbax ``CheckpointManager`` for train states: save every ``save_every`` steps, keep ``keep``, async.

    Arrays are written as one zarr array each (no OCDBT). With the state on accelerators, :meth:`save` copies it
    in device memory and returns while Orbax writes; with the state on CPU it writes the live buffers and returns
    once written (host memory holds the train state once, not twice; the step after it donates those buffers).

    Each checkpoint has two items: "state" (the :class:`Trainer` state pytree: trainable parameters, optimizer
    state, step, RNG) and "meta" (JSON: data position, model config, train config).

    Raises (from :meth:`restore`):
      ValueError: the checkpoint's arrays do not match the trainer's (different model shape, LoRA rank or
        targets), naming the first mismatched parameter path and both shapes.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 100, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every}, {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
            # one zarr array per leaf, no OCDBT: OCDBT buffers the whole state in host memory while it writes
            # (+1.45 GB for SmolLM2-135M's 1.6 GB train state, measured), plain zarr one chunk at a time (+0.15 GB)
            item_handlers={
                "state": ocp.StandardCheckpointHandler(use_ocdbt=False),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        # Orbax's note that it skips the OCDBT merge (there is none to do) is logged by its background thread
        from llama_jax.logs import _ORBAX_NOISE, _DropMessages

        self._quiet = _DropMessages(_ORBAX_NOISE)
        from absl import logging as absl_logging

        self._loggers = [absl_logging.get_absl_logger()]
        for lg in self._loggers:
            lg.addFilter(self._quiet)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: Mapping, *, force: bool = False) -> bool:
        ocp = self._ocp
        if not force and (step % self.save_every or step in (self.manager.all_steps() or ())):
            return False
        leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
        on_host = all(d.platform == "cpu" for x in leaves for d in x.devices())
        if not on_host:
            # a private copy (in device memory): the train step donates its state buffers, which an asynchronous
            # save may still read
            state = jax.tree.map(jnp.copy, state)
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
            force=True,
        )
        if on_host:
            # CPU: Orbax's device-to-host transfer is a view of the live buffers, so a copy would be a second train
            # state in RAM (+1.6 GB for SmolLM2-135M); the write finishes instead before the next (donating) step
            self.manager.wait_until_finished()
        return saved

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
        for lg in self._loggers:
            lg.removeFilter(self._quiet)

    def reload(self) -> None:
        """Re-reads the list of checkpoints on disk (after one was moved aside)."""
        self.manager.reload()

    def restore(self, step: int, target_state) -> tuple[Any, dict]:
        """Restores ``step`` into arrays shaped (and sharded) like ``target_state``; returns (state, meta)."""
        ocp = self._ocp
        meta_tree = self.manager.item_metadata(step)["state"]
        _check_shapes(target_state, meta_tree, os.path.join(self.directory, str(step)))

        def abstract(x):
            sharding = getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        target = jax.tree.map(abstract, target_state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["meta"])


def _flatten_paths(tree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_path_names(p)): v for p, v in flat}


def _check_shapes(target, saved_meta, where: str) -> None:
    want = _flatten_paths(target)
    have = _flatten_paths(saved_meta)
    order = sorted(want, key=lambda p: not p.startswith("params."))  # name model parameters first
    for path in order:
        x = want[path]
        if path not in have:
            raise ValueError(
                f"checkpoint {where}: parameter {path!r} (shape {tuple(x.shape)}) is missing; the "
                f"checkpoint is from a different model or LoRA configuration"
            )
        shape = tuple(getattr(have[path], "shape", ()) or ())
        if shape != tuple(x.shape):
            raise ValueError(
                f"checkpoint {where}: parameter {path!r} has shape {shape}, the model expects "
                f"{tuple(x.shape)} (checkpoint from a different model shape)"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(
            f"checkpoint {where}: unexpected parameter {extra[0]!r}; the checkpoint is from a "
            f"different model or LoRA configuration"
        )


# ---------------------------------------------------------------------------------------------------- loop
def _read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill mid-write: it is re-done after the resume
                break
    return out


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keeps the records of steps <= last_step (those after the restored checkpoint are recomputed)."""
    records = [r for r in _read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class NonFiniteLossError(ValueError):
    """The training loss became NaN or inf; the message names the step. Nothing of that step was saved."""


def _restore_newest_intact(checkpointer: Checkpointer, target_state):
    """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

    A damaged checkpoint (a truncated array chunk, an emptied ``_METADATA``, ...) is reported on stderr naming its
    directory and moved aside into ``DIR/damaged/STEP`` (it was written by this trainer, so it is not deleted), so
    that the step is redone and saved again. A checkpoint of another model shape is not damage: its ValueError
    from :meth:`Checkpointer.restore` propagates.
    """
    import shutil
    import sys

    for step in sorted(checkpointer.manager.all_steps() or (), reverse=True):
        where = os.path.join(checkpointer.directory, str(step))
        try:
            state, meta = checkpointer.restore(step, target_state)
            if not isinstance(meta.get("data"), Mapping):
                raise ValueError("its meta item has no data position")
            return step, state, meta
        except ValueError as e:
            if "different model" in str(e) or "model expects" in str(e):
                raise
            err = e
        except Exception as e:  # noqa: BLE001 - tensorstore / JSON / Orbax errors of a damaged checkpoint
            err = e
        aside = os.path.join(checkpointer.directory, "damaged", str(step))
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        if os.path.lexists(aside):
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(where, aside)
        print(
            f"warning: checkpoint {where} is damaged ({type(err).__name__}: {str(err)[:200]}); moved to {aside}, "
            "resuming from the next newest intact checkpoint",
            file=sys.stderr,
        )
        checkpointer.reload()
    return None


class _SigTerm:
    def __init__(self):
        self.received = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def fit(
    trainer: Trainer,
    loader,
    steps: int,
    *,
    checkpointer: Checkpointer | None = None,
    metrics_path: str | None = None,
    eval_fn: Callable[[], dict] | None = None,
    eval_every: int = 0,
    progress: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Trains until ``trainer`` has done ``steps`` optimizer steps, resuming from ``checkpointer`` if it has one.

    Resume restores the train state (parameters, optimizer state, step, RNG) and the loader position, and drops
    metric records written after that checkpoint (they are recomputed, bitwise identically on CPU), so the
    metrics JSONL holds each step exactly once. Each step appends {"step", "loss", "tokens", "grad_norm", "lr"}
    (and the ``eval_fn()`` dict every ``eval_every`` steps). SIGTERM: the current step finishes, a checkpoint is
    saved and waited for, and the function returns with ``{"interrupted": True}``.

    Returns:
      {"step": final step, "interrupted": bool, "resumed_from": step or None}.
    """
    resumed = None
    if checkpointer is not None and checkpointer.latest_step() is not None:
        found = _restore_newest_intact(checkpointer, trainer.state)
        if found is not None:
            resumed, state, meta = found
            trainer.state = state
            loader.restore(meta["data"])
    if metrics_path:
        _truncate_metrics(metrics_path, trainer.step_count())
    start = trainer.step_count()

    def meta():
        return {"data": loader.state(), "model_config": trainer.config.to_dict(), "train_config": trainer.cfg.to_dict()}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", unit="step")
    interrupted = False
    mf = open(metrics_path, "a") if metrics_path else None
    try:
        with _SigTerm() as sig:
            for _ in range(start, steps):
                batch = loader.next()
                m = trainer.train_step(batch)
                step = trainer.step_count()
                for key in ("loss", "grad_norm"):  # a non-finite gradient makes the next weights NaN
                    if key in m and not np.isfinite(m[key]):
                        raise NonFiniteLossError(f"step {step}: the training {key.replace('_', ' ')} is {m[key]}")
                record = {"step": step, **m}
                if eval_fn is not None and eval_every and step % eval_every == 0:
                    record.update(eval_fn())
                if mf:
                    mf.write(json.dumps(record) + "\n")
                    mf.flush()
                if on_step:
                    on_step(step, record)
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}")
                if checkpointer is not None:
                    checkpointer.save(step, trainer.state, meta(), force=sig.received or step == steps)
                if sig.received:
                    interrupted = True
                    break
    finally:
        if mf:
            mf.close()
        if bar:
            bar.close()
        if checkpointer is not None:
            checkpointer.wait()
    return {"step": trainer.step_count(), "interrupted": interrupted, "resumed_from": resumed}
