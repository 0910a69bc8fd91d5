"""XLA's compiled memory estimate of one fine-tuning step (forward, backward, AdamW update), without running it.

    python experiments/finetune_memory.py                                   # SmolLM2-135M, batch 8 x 512
    python experiments/finetune_memory.py --remat=none --loss_chunk=0       # the old default, for comparison

Parameters, gradients and Adam moments are float32 (as ``llama_jax.train.Trainer`` keeps them); the step is
lowered on abstract shapes (``jax.ShapeDtypeStruct``, nothing allocated) and compiled for the local backend; the
table gives XLA's argument (parameters + optimizer state + batch), temporary and total bytes. The real process
adds the Python/JAX runtime (~0.5 GB) and the host copy of the checkpoint while loading; measure that with::

    /usr/bin/time -v python experiments/finetune.py --workdir=/tmp/ft_mem --steps=3 --seq_len=512 --batch_size=8 \
        --save_every=100          # "Maximum resident set size"

Source: ``jax.stages.Compiled.memory_analysis()``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS


def define_flags():
    """Defined by ``__main__`` only, so that tests can import :func:`step_memory` beside other programs' flags."""
    flags.DEFINE_string("checkpoint", None, "llama-jax checkpoint whose config to use (default: SmolLM2-135M)")
    flags.DEFINE_integer("batch_size", 8, "rows per step (B)")
    flags.DEFINE_integer("seq_len", 512, "tokens per row (T)")
    flags.DEFINE_enum("remat", "full", ["full", "dots", "none"], "rematerialisation policy")
    flags.DEFINE_integer("loss_chunk", 128, "positions per cross-entropy chunk (0: whole sequence)")


def step_memory(config, batch_size: int, seq_len: int, remat, loss_chunk: int) -> dict:
    """{"arguments", "temporaries", "outputs", "total"} bytes of the compiled train step."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from llama_jax import train
    from llama_jax.model import Llama

    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32, remat=remat))
    graphdef, state = nnx.split(abstract, nnx.Param)
    params = nnx.to_pure_dict(state)
    tx = train.make_optimizer(train.TrainConfig(), params)
    opt_state = jax.eval_shape(tx.init, params)
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    batch = {
        "tokens": tokens,
        "targets": tokens,
        "positions": tokens,
        "segment_ids": tokens,
        "loss_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32),
    }

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(train.loss_fn, argnums=1)(graphdef, params, batch, loss_chunk)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "outputs": m.output_size_in_bytes - m.alias_size_in_bytes,
    }
    out["total"] = sum(out.values())
    return out


def main(argv):
    del argv
    from llama_jax import checkpoint
    from llama_jax.default_model import default_checkpoint
    from llama_jax.logs import quiet_unless_verbose

    quiet_unless_verbose()
    config = checkpoint.read_config(FLAGS.checkpoint or default_checkpoint())
    remat = None if FLAGS.remat == "none" else FLAGS.remat
    m = step_memory(config, FLAGS.batch_size, FLAGS.seq_len, remat, FLAGS.loss_chunk)
    print(
        f"train step, batch {FLAGS.batch_size} x {FLAGS.seq_len}, remat={FLAGS.remat}, loss_chunk={FLAGS.loss_chunk}:"
    )
    for k, v in m.items():
        print(f"  {k:12s} {v / 2**30:7.2f} GiB")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
