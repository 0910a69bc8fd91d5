"""Ahead-of-time memory planning: what fits where, before renting hardware.

    python -m llama_jax.plan --model=llama3.1-405b --mesh=tensor=8 --dtype=bfloat16 --quant=none \\
        --batch=1 --max_length=131072 [--prefill_length=512] [--train --train_length=4096]

For the given mesh, the planner builds the model abstractly (``nnx.eval_shape``: ``jax.ShapeDtypeStruct``
parameters carrying their ``NamedSharding``s, nothing allocated) and lowers and compiles, ahead of time, on fake
CPU devices (one per mesh position):

* prefill: ``model(tokens [B, prefill_length], kv_cache=cache)`` -> (last logits [B, V], cache'), cache donated;
* decode: the same call with one token per row;
* with ``--train``: one training step (next-token loss of ``llama_jax.train.loss_fn``, gradients, AdamW update
  of ``llama_jax.train.make_optimizer``) on [B, train_length] tokens, parameters and optimizer state donated.

Per device it reports parameter bytes and KV-cache bytes (from the shardings), XLA temporaries
(``compiled.memory_analysis().temp_size_in_bytes``) and outputs not aliased to donated inputs, their total, and
whether it fits in ``usable_fraction`` of H200 (141 GB), H100 (80 GB), TPU v5p (95 GB), v5e (16 GB) and v6e (32 GB).

``--quant=int8`` stores every matmul weight and the embedding as int8 with per-output-channel scales (the
parameter dtype; one scale per output channel, per row for the embedding table); the model dequantizes each layer's
weights inside the layer scan. Norm scales stay in ``--dtype``.

Caveats: temporaries come from the XLA:CPU compiler, so on GPU/TPU they are an estimate. The attention compiled is
the blockwise path of ``llama_jax.attention`` (online softmax over key blocks: O(prefill_length x block) score
memory per layer, independent of max_length; ``attention_impl="reference"`` plans the dense einsum form instead);
the parameter and cache bytes are exact. XLA:CPU has no bfloat16 matmul and would convert whole stacked bf16
weights to float32 (hoisted out of the layer loop), so bf16 is lowered as float16 (same bytes per element); XLA:CPU
still upcasts one layer's weights and the output head to
float32 inside the loop, which keeps the temporaries conservative (by about 3 GB per device for 405B on 8 devices).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import sharding as S
from llama_jax.config import LlamaConfig, get_preset

# int8 weights: the planner measures exactly the tree that real quantized models hold.
from llama_jax.quant import QUANT_REDUCE, QArray, abstract_quantized_state, quantize_state  # noqa: F401

GB = 1e9
#: Device memory in GB (10^9 bytes), as sold.
DEVICES = {"H200": 141.0, "H100": 80.0, "TPU v5p": 95.0, "TPU v5e": 16.0, "TPU v6e": 32.0}
QUANT = ("none", "int8")


# ------------------------------------------------------------------------------------------- planning
@dataclasses.dataclass
class ProgramMemory:
    """Per-device bytes of one compiled program."""

    name: str
    params: int
    cache: int
    optimizer: int
    temp: int
    other_outputs: int
    compile_s: float

    @property
    def total(self) -> int:
        return self.params + self.cache + self.optimizer + self.temp + self.other_outputs


def tree_bytes_per_device(tree) -> int:
    """Bytes one device holds for a tree of sharded ``ShapeDtypeStruct``s (the fullest device)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _analysis(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return 0, 0
    other = max(0, int(m.output_size_in_bytes) - int(m.alias_size_in_bytes))
    return int(m.temp_size_in_bytes), other


def plan(
    config: LlamaConfig,
    mesh,
    dtype="bfloat16",
    quant: str = "none",
    batch: int = 1,
    max_length: int = 131072,
    prefill_length: int = 512,
    train: bool = False,
    train_length: int = 4096,
    remat: str = "full",
    rules=None,
    bf16_as_f16: bool = True,
    log=print,
    attention_impl: str | None = None,
) -> list[ProgramMemory]:
    """Lowers and compiles prefill, decode (and the train step) for abstract sharded inputs; returns their memory.

    Args:
      config: the architecture.
      mesh: a (data, fsdp, tensor) mesh (fake CPU devices are fine: nothing is allocated).
      dtype: parameter, activation and KV-cache dtype.
      quant: "none" or "int8" (see the module docstring).
      batch: B rows; max_length: S cache slots per row; prefill_length: T tokens per prefill chunk.
      train, train_length, remat: also the training step on [B, train_length] with this remat policy.
      rules: logical-axis rules.
      bf16_as_f16: on CPU devices, lower bfloat16 as float16 (same bytes; see the module docstring).
      attention_impl: the model's attention (``llama_jax.attention.attend``); None: what the backend picks
        (blockwise on CPU devices).

    Raises:
      ValueError: bad quant / sizes, or a mesh that cannot shard the model (from ``sharding.validate``).
    """
    if quant not in QUANT:
        raise ValueError(f"--quant must be one of {QUANT}, got {quant!r}")
    if batch < 1:
        raise ValueError(f"--batch must be positive, got {batch}")
    if not 0 < max_length <= config.max_seq_len:
        raise ValueError(f"--max_length must be in [1, {config.max_seq_len}], got {max_length}")
    if not 0 < prefill_length <= max_length:
        raise ValueError(f"--prefill_length must be in [1, --max_length={max_length}], got {prefill_length}")
    if quant != "none" and train:
        raise ValueError("--train plans full fine-tuning and needs --quant=none")
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and bf16_as_f16 and all(d.platform == "cpu" for d in mesh.devices.flat):
        # XLA:CPU has no bfloat16 dot: it converts bf16 operands to float32 and hoists the conversion of whole
        # stacked weights out of the layer loop, doubling the parameter bytes in temporaries. float16 (same
        # 2 bytes) is converted one layer at a time inside the loop; the bytes of every array are unchanged.
        dtype = jnp.dtype(jnp.float16)
    S.validate(config, mesh, rules)
    graphdef, state = S.abstract_state(
        config,
        mesh,
        rules,
        param_dtype=dtype,
        dtype=dtype,
        remat=remat if train else None,
        attention_impl=attention_impl,
    )
    if quant == "int8":
        state = abstract_quantized_state(state, embeddings=True, mesh=mesh, rules=rules)
    param_bytes = tree_bytes_per_device(state)
    cache = S.abstract_cache(config, mesh, batch, max_length, dtype, rules)
    cache_sh = jax.tree.map(lambda x: x.sharding, cache)
    cache_bytes = tree_bytes_per_device(cache)
    out = []

    logits_sh = S.named_sharding(("batch", "vocab"), (batch, config.vocab_size), mesh, rules)

    def serve(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, kv_cache=cache)
        return logits[:, -1], cache

    serve_jit = jax.jit(serve, out_shardings=(logits_sh, cache_sh), donate_argnames="cache")
    for name, t in (("prefill", prefill_length), ("decode", 1)):
        tokens = jax.ShapeDtypeStruct((batch, t), jnp.int32, sharding=S.batch_sharding(mesh, (batch, t), rules))
        start = time.perf_counter()
        compiled = serve_jit.lower(state, tokens, cache).compile()
        temp, other = _analysis(compiled)
        out.append(
            ProgramMemory(f"{name} (T={t})", param_bytes, cache_bytes, 0, temp, other, time.perf_counter() - start)
        )
        log(f"compiled {out[-1].name} in {out[-1].compile_s:.1f} s")

    if train:
        out.append(_plan_train(config, graphdef, state, mesh, batch, train_length, rules, param_bytes, log))
    return out


def _plan_train(config, graphdef, state, mesh, batch, length, rules, param_bytes, log) -> ProgramMemory:
    import optax

    from llama_jax import train as T

    cfg = T.TrainConfig(remat=None, warmup_steps=1)
    tx = T.make_optimizer(cfg, state)
    opt_state = jax.eval_shape(tx.init, state)
    rep = NamedSharding(mesh, PartitionSpec())
    param_sh = jax.tree.map(lambda x: x.sharding, state)
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, sh: sh, opt_state, param_sh, transform_non_params=lambda _: rep
    )
    opt_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), opt_state, opt_sh)
    tok_sh = S.batch_sharding(mesh, (batch, length), rules)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=tok_sh)
    batch_tree = {
        "tokens": tokens,
        "positions": tokens,
        "segment_ids": tokens,
        "targets": tokens,
        "loss_mask": jax.ShapeDtypeStruct((batch, length), jnp.float32, sharding=tok_sh),
    }

    def step(state, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: T.loss_fn(graphdef, p, batch))(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    start = time.perf_counter()
    compiled = (
        jax.jit(step, out_shardings=(param_sh, opt_sh, rep), donate_argnums=(0, 1))
        .lower(state, opt_state, batch_tree)
        .compile()
    )
    temp, other = _analysis(compiled)
    mem = ProgramMemory(
        f"train step (T={length})",
        param_bytes,
        0,
        tree_bytes_per_device(opt_state),
        temp,
        other,
        time.perf_counter() - start,
    )
    log(f"compiled {mem.name} in {mem.compile_s:.1f} s")
    return mem


def expected_param_bytes(config: LlamaConfig, mesh, dtype) -> float:
    """Arithmetic per-device parameter bytes: count x bytes / shards, treating every parameter as sharded over the
    mesh axes its rules use (tensor x fsdp); norms and replicated K/V make the real figure slightly larger."""
    shards = mesh.shape["tensor"] * mesh.shape["fsdp"]
    return config.num_params() * jnp.dtype(dtype).itemsize / shards


def format_report(progs: list[ProgramMemory], usable_fraction: float, title: str) -> str:
    lines = [
        title,
        f"{'program':<24}{'params':>10}{'kv cache':>10}{'optimizer':>10}{'XLA temp':>10}"
        f"{'outputs':>10}{'total':>10}   (GB per device)",
    ]
    for p in progs:
        lines.append(
            f"{p.name:<24}"
            + "".join(f"{v / GB:>10.2f}" for v in (p.params, p.cache, p.optimizer, p.temp, p.other_outputs, p.total))
        )
    peak = max(p.total for p in progs)
    fits = [
        f"{d} ({cap:g} GB): {'fits' if peak <= cap * GB * usable_fraction else 'does NOT fit'}"
        for d, cap in DEVICES.items()
    ]
    lines.append(f"peak {peak / GB:.2f} GB per device; against {usable_fraction:.0%} of device memory:")
    lines.extend("  " + f for f in fits)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI
def _flags():
    from absl import flags

    flags.DEFINE_string("model", "llama3.1-405b", "preset name (llama_jax.config.PRESETS)")
    flags.DEFINE_string("mesh", "tensor=8", "mesh, e.g. data=1,fsdp=2,tensor=4 (one fake CPU device per position)")
    flags.DEFINE_string("dtype", "bfloat16", "parameter / activation / KV-cache dtype")
    flags.DEFINE_enum("quant", "none", list(QUANT), "weight storage: none, or int8 with per-channel scales")
    flags.DEFINE_integer("batch", 1, "rows per call (B)")
    flags.DEFINE_integer("max_length", 131072, "KV-cache slots per row (S)")
    flags.DEFINE_integer("prefill_length", 512, "tokens per prefill chunk (T)")
    flags.DEFINE_bool("train", False, "also plan one full fine-tuning step (loss, grads, AdamW)")
    flags.DEFINE_integer("train_length", 4096, "tokens per row of the training batch")
    flags.DEFINE_enum("remat", "full", ["none", "full", "dots"], "remat policy of the training step")
    flags.DEFINE_float("usable_fraction", 0.9, "fraction of device memory the plan may use")
    flags.DEFINE_string("json_out", None, "also write the figures (bytes per device) as JSON to this file")
    return flags.FLAGS


MAX_PLAN_DEVICES = 1024  # one fake CPU device per mesh position; XLA:CPU refuses meshes of 4096 (tried)
PLAN_DTYPES = ("float32", "bfloat16", "float16")


def main(argv):
    FLAGS = _flags_holder[0]
    from llama_jax.logs import quiet_unless_verbose

    quiet_unless_verbose()  # no libtpu "Unable to initialize backend 'tpu'" INFO line
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    try:
        sizes = S.parse_mesh_sizes(FLAGS.mesh)
        if math.prod(sizes.values()) > MAX_PLAN_DEVICES:
            raise ValueError(
                f"--mesh={FLAGS.mesh} describes {math.prod(sizes.values())} devices; the planner "
                f"describes at most {MAX_PLAN_DEVICES} (plan one slice: memory per device depends on "
                "the shards, not on how many copies of the slice run)"
            )
        config = get_preset(FLAGS.model)
        if FLAGS.dtype not in PLAN_DTYPES:
            raise ValueError(f"--dtype={FLAGS.dtype!r}: expected one of {', '.join(PLAN_DTYPES)}")
        dtype = jnp.dtype(FLAGS.dtype)
        for name in ("batch", "max_length", "prefill_length", "train_length"):
            if FLAGS[name].value < 1:
                raise ValueError(f"--{name} must be >= 1, got {FLAGS[name].value}")
        if not 0 < FLAGS.usable_fraction <= 1:
            raise ValueError(f"--usable_fraction must be in (0, 1], got {FLAGS.usable_fraction}")
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = math.prod(sizes.values())
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except Exception:  # noqa: BLE001 -- backend already initialised: use what exists
        pass
    cpus = jax.devices("cpu")
    if len(cpus) < n:
        print(
            f"error: --mesh={FLAGS.mesh} needs {n} CPU devices, only {len(cpus)} available "
            f"(set XLA_FLAGS=--xla_force_host_platform_device_count={n})",
            file=sys.stderr,
        )
        return 2
    try:
        mesh = S.make_mesh(**sizes, devices=cpus[:n])
        start = time.perf_counter()
        progs = plan(
            config,
            mesh,
            dtype,
            FLAGS.quant,
            FLAGS.batch,
            FLAGS.max_length,
            FLAGS.prefill_length,
            FLAGS.train,
            FLAGS.train_length,
            None if FLAGS.remat == "none" else FLAGS.remat,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        print(
            f"error: --mesh={FLAGS.mesh}: XLA cannot plan on this mesh ({str(e).splitlines()[0][:200]})",
            file=sys.stderr,
        )
        return 2
    title = (
        f"{FLAGS.model} dtype={dtype.name} quant={FLAGS.quant} mesh={FLAGS.mesh} batch={FLAGS.batch} "
        f"max_length={FLAGS.max_length} ({config.num_params() / 1e9:.1f}B parameters; "
        f"arithmetic params/device {expected_param_bytes(config, mesh, dtype) / GB:.2f} GB"
        f"{' before int8' if FLAGS.quant == 'int8' else ''}; planned in {time.perf_counter() - start:.0f} s)"
    )
    print(format_report(progs, FLAGS.usable_fraction, title))
    if FLAGS.json_out:
        import json
        import os

        peak = max(p.total for p in progs)
        report = {
            "model": FLAGS.model,
            "mesh": sizes,
            "dtype": jnp.dtype(FLAGS.dtype).name,
            "quant": FLAGS.quant,
            "batch": FLAGS.batch,
            "max_length": FLAGS.max_length,
            "num_params": config.num_params(),
            "programs": [dict(dataclasses.asdict(p), total=p.total) for p in progs],
            "fits": {d: peak <= cap * GB * FLAGS.usable_fraction for d, cap in DEVICES.items()},
        }
        tmp = FLAGS.json_out + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
            os.replace(tmp, FLAGS.json_out)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            print(f"error: --json_out: {FLAGS.json_out}: cannot write ({e.strerror or e})", file=sys.stderr)
            return 2
    return 0


_flags_holder: list = []

if __name__ == "__main__":
    from absl import app

    _flags_holder.append(_flags())
    app.run(main)
