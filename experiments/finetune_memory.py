"""Fine-tuning memory: resident memory per phase of a real run, and XLA's compiled estimate of one train step
(forward, backward, AdamW update) without running it.

    python experiments/finetune_memory.py                                   # SmolLM2-135M, batch 8 x 512, 3 steps
    python experiments/finetune_memory.py --nophases --remat=none --loss_chunk=0   # old default, estimate only

Parameters, gradients and Adam moments are float32 (as ``llama_jax.train.Trainer`` keeps them); the step is
lowered on abstract shapes (``jax.ShapeDtypeStruct``, nothing allocated) and compiled for the local backend; the
table gives XLA's argument (parameters + optimizer state + batch), temporary and total bytes. The real process
adds the Python/JAX runtime (~0.8 GB with the compiled programs); measure the whole program with::

    /usr/bin/time -v python experiments/finetune.py --workdir=/tmp/ft_mem --steps=3 --seq_len=512 --batch_size=8 \
        --save_every=100          # "Maximum resident set size"

``--phases`` (default) also runs the real thing and prints the process's resident memory after each phase
(``VmRSS`` now, ``VmHWM`` the peak so far, from ``/proc/self/status``): imports, checkpoint load, ``Trainer``
(float32 master weights + AdamW moments), the step's ahead-of-time compile, ``--steps`` steps on random tokens, a
train-checkpoint save, the export of the model. ``--nophases`` prints the XLA estimate alone (seconds).

Source: ``jax.stages.Compiled.memory_analysis()``; ``proc(5)`` for VmRSS / VmHWM.
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
    flags.DEFINE_bool("phases", True, "also run load, trainer, compile, steps, save, export; print RSS after each")
    flags.DEFINE_integer("steps", 3, "train steps run by --phases")


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


def rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes (Linux ``/proc/self/status``; (0, 0) elsewhere)."""
    now = peak = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    now = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return now, peak


def phase_rss(ckpt_dir: str, batch_size: int, seq_len: int, steps: int, tc, workdir: str, report=print) -> list:
    """Runs a full fine-tuning of ``ckpt_dir`` phase by phase; [(phase, VmRSS, VmHWM, seconds)] (also reported).

    The step is compiled ahead of time (``Trainer.compile_step``) so that its compile memory is its own phase.
    """
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llama_jax import checkpoint, train

    rows = []

    def mark(name, t0):
        now, peak = rss_bytes()
        rows.append((name, now, peak, time.time() - t0))
        report(f"  {name:34s} {now / 1e9:6.2f} GB {peak / 1e9:8.2f} GB {rows[-1][3]:8.1f} s")

    report(f"  {'phase':34s} {'VmRSS':>9s} {'VmHWM':>11s} {'time':>10s}")
    mark("imports", time.time())
    t0 = time.time()
    model = checkpoint.load(ckpt_dir, dtype=jnp.float32)
    mark("checkpoint.load (float32)", t0)
    t0 = time.time()
    trainer = train.Trainer(model, tc)
    del model  # the trainer holds the parameters (the same buffers)
    mark("Trainer (params + AdamW moments)", t0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, trainer.config.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
        "loss_mask": np.ones((batch_size, seq_len), np.float32),
    }
    t0 = time.time()
    trainer.compile_step(batch)
    mark("step compiled (ahead of time)", t0)
    for i in range(steps):
        t0 = time.time()
        m = trainer.train_step(batch)
        mark(f"step {i + 1} (loss {m['loss']:.3f})", t0)
    t0 = time.time()
    ck = train.Checkpointer(os.path.join(workdir, "ckpt"), save_every=1, keep=1)
    ck.save(trainer.step_count(), trainer.state, {"data": {}}, force=True)
    ck.wait()
    ck.close()
    mark("train checkpoint saved", t0)
    t0 = time.time()
    exported = trainer.export_model()
    jax.block_until_ready(jax.tree.leaves(nnx.to_pure_dict(nnx.state(exported))))
    mark("export_model", t0)
    return rows


def main(argv):
    del argv
    from llama_jax import checkpoint
    from llama_jax.default_model import default_checkpoint
    from llama_jax.logs import quiet_unless_verbose

    quiet_unless_verbose()
    ckpt_dir = FLAGS.checkpoint or default_checkpoint()
    config = checkpoint.read_config(ckpt_dir)
    remat = None if FLAGS.remat == "none" else FLAGS.remat
    if FLAGS.phases:  # first, so that the table starts from a bare process
        import tempfile

        from llama_jax import train

        tc = train.TrainConfig(remat=remat, loss_chunk=FLAGS.loss_chunk, total_steps=max(FLAGS.steps, 1))
        print(
            f"resident memory after each phase, batch {FLAGS.batch_size} x {FLAGS.seq_len}, {FLAGS.steps} steps "
            f"(GB = 1e9 bytes):"
        )
        with tempfile.TemporaryDirectory() as work:
            phase_rss(ckpt_dir, FLAGS.batch_size, FLAGS.seq_len, FLAGS.steps, tc, work)
    m = step_memory(config, FLAGS.batch_size, FLAGS.seq_len, remat, FLAGS.loss_chunk)
    print(
        f"XLA's estimate of the train step, batch {FLAGS.batch_size} x {FLAGS.seq_len}, remat={FLAGS.remat}, "
        f"loss_chunk={FLAGS.loss_chunk}:"
    )
    for k, v in m.items():
        print(f"  {k:12s} {v / 2**30:7.2f} GiB")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
