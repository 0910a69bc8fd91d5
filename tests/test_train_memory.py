"""Fine-tuning memory: the loss makes logits a chunk of positions at a time (never [B, T, V] at once) with the
same loss and gradients as the whole-sequence loss, and the default TrainConfig rematerialises each layer."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import train
from llama_jax.config import LlamaConfig

CFG = LlamaConfig(
    vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=512, rope_theta=10000.0
)


def _batch(b, t, vocab, seed=0):
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, vocab, size=(b, t + 1)).astype(np.int32)
    return dict(
        tokens=seq[:, :-1],
        targets=seq[:, 1:],
        loss_mask=(rng.random((b, t)) > 0.3).astype(np.float32),
        positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
        segment_ids=np.ones((b, t), np.int32),
    )


def _whole_sequence_loss(graphdef, params, batch):
    """The reference: full [B, T, V] logits, then optax's cross-entropy (the loss before chunking)."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
    s, n = train.cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
    return s / n


def test_chunked_loss_and_gradients_equal_whole_sequence():
    for tied in (True, False):
        cfg = LlamaConfig(**{**CFG.to_dict(), "tie_word_embeddings": tied})
        model = train.host_random_model(cfg, seed=1, param_dtype=jnp.float32)
        graphdef, state = nnx.split(model, nnx.Param)
        params = nnx.to_pure_dict(state)
        batch = _batch(3, 37, cfg.vocab_size)  # 37 = 4 chunks of 10 with 3 padded positions
        ref, g_ref = jax.jit(jax.value_and_grad(_whole_sequence_loss, argnums=1), static_argnums=0)(
            graphdef, params, batch
        )
        for chunk in (10, 0) if tied else (10,):
            loss, g = jax.jit(jax.value_and_grad(train.loss_fn, argnums=1), static_argnums=(0, 3))(
                graphdef, params, batch, chunk
            )
            # float32 sums of ~100 terms in another order: a few ulps of the loss (~1e-7 relative)
            assert abs(float(loss) - float(ref)) <= 1e-6 * abs(float(ref)), (tied, chunk, loss, ref)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
                rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-30)
                assert rel <= 1e-5, (tied, chunk, rel)


# a large vocabulary and a short sequence: the logits, not attention, dominate a step's memory
BIG_VOCAB = LlamaConfig(**{**CFG.to_dict(), "vocab_size": 32768})


def _step_temp_bytes(chunk, remat, b, t):
    model = train.host_random_model(BIG_VOCAB, seed=0, param_dtype=jnp.float32, remat=remat)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    batch = jax.tree.map(jnp.asarray, _batch(b, t, BIG_VOCAB.vocab_size))
    grad = jax.jit(jax.grad(lambda p, bt: train.loss_fn(graphdef, p, bt, chunk=chunk)))
    return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_never_holds_the_full_logits():
    b, t = 4, 128
    logits_bytes = b * t * BIG_VOCAB.vocab_size * 4  # 64 MiB of float32 logits
    whole = _step_temp_bytes(0, "full", b, t)
    chunked = _step_temp_bytes(16, "full", b, t)
    print(
        f"XLA temp bytes of a gradient step: whole-sequence loss {whole / 2**20:.1f} MiB, "
        f"16-position chunks {chunked / 2**20:.1f} MiB, full logits {logits_bytes / 2**20:.1f} MiB"
    )
    assert whole >= logits_bytes  # the reference holds [B, T, V] (and more)
    assert chunked < logits_bytes / 2  # the chunked loss never does


def test_default_config_rematerialises_and_chunks():
    cfg = train.TrainConfig()
    assert cfg.remat == "full" and cfg.loss_chunk == 128
    trainer = train.Trainer(
        train.host_random_model(CFG, param_dtype=jnp.float32), train.TrainConfig(learning_rate=1e-3, total_steps=2)
    )
    m = trainer.train_step(_batch(2, 64, CFG.vocab_size))
    assert np.isfinite(m["loss"]) and m["tokens"] > 0


def test_smollm2_batch_8x512_step_buffers_under_3_5_gib(smollm2_checkpoint):
    """XLA's compiled estimate (arguments + temporaries) of a full fine-tuning step of SmolLM2-135M at batch
    8 x 512 with the defaults stays under 3.5 GiB (14.3 GiB with remat=None and the whole-sequence loss)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    from finetune_memory import step_memory

    from llama_jax import checkpoint

    cfg = train.TrainConfig()
    m = step_memory(checkpoint.read_config(smollm2_checkpoint), 8, 512, cfg.remat, cfg.loss_chunk)
    print({k: f"{v / 2**30:.2f} GiB" for k, v in m.items()})
    assert m["total"] < 3.5 * 2**30, m


def _state_bytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_train_step_donates_params_and_optimizer_state():
    """The step runs in place: XLA aliases every byte of the parameters and AdamW moments to its outputs and the
    previous state's buffers are deleted, so a step never holds two train states (SmolLM2-135M: 1.6 GB each)."""
    cfg = train.TrainConfig(learning_rate=1e-3, total_steps=3)
    batch = _batch(2, 32, CFG.vocab_size)
    trainer = train.Trainer(train.host_random_model(CFG, param_dtype=jnp.float32), cfg)
    compiled = trainer.compile_step(batch)
    state_bytes = _state_bytes({"params": trainer.state["params"], "opt_state": trainer.state["opt_state"]})
    assert compiled.memory_analysis().alias_size_in_bytes >= state_bytes, (compiled.memory_analysis(), state_bytes)
    old = jax.tree.leaves(trainer.state)
    m1 = trainer.train_step(batch)
    assert all(x.is_deleted() for x in old)  # donated, not copied
    assert not any(x.is_deleted() for x in jax.tree.leaves(trainer.state))
    # the ahead-of-time executable is the jitted step: the same losses, bit for bit, as a trainer that never
    # called compile_step (one program, same inputs)
    ref = train.Trainer(train.host_random_model(CFG, param_dtype=jnp.float32), cfg)
    r1 = ref.train_step(batch)
    assert m1 == r1, (m1, r1)
    assert trainer.train_step(batch) == ref.train_step(batch)


def test_cpu_checkpoint_save_writes_the_live_state_once(tmp_path):
    """On CPU the train checkpoint is written from the state's own buffers (no private copy: a second train state
    in RAM) and is complete when ``save`` returns, so the next step may donate those buffers; it is plain zarr
    (OCDBT buffers the whole state while writing). Restoring it gives the saved state exactly."""
    batch = _batch(2, 32, CFG.vocab_size)
    trainer = train.Trainer(
        train.host_random_model(CFG, param_dtype=jnp.float32), train.TrainConfig(learning_rate=1e-3, total_steps=3)
    )
    trainer.train_step(batch)
    saved = jax.tree.map(np.array, trainer.state)  # host copies for the comparison
    ck = train.Checkpointer(tmp_path / "ck", save_every=1)
    assert ck.save(1, trainer.state, {"data": {}}, force=True)
    assert not ck.manager.is_saving_in_progress()  # written before returning
    trainer.train_step(batch)  # donates the buffers that were just written
    step_dir = tmp_path / "ck" / "1" / "state"
    assert not list(step_dir.glob("**/manifest.ocdbt")), sorted(p.name for p in step_dir.iterdir())
    restored, _ = ck.restore(1, trainer.state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    ck.close()
