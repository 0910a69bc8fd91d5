"""Meta's reference Llama 3 (``llama_models.llama3.model.Transformer``) run for real on CPU, float32.

The reference builds its layers with fairscale model parallelism, so it needs ``torch.distributed``: every run
spawns ``world_size`` worker processes (this file run as a script) under the gloo backend with fairscale
``initialize_model_parallel(world_size)``. Nothing here imports jax.

- :func:`write_meta_checkpoint`: random weights, each rank saves its own ``consolidated.{rank:02d}.pth`` exactly as
  Meta's training code shards them; rank 0 writes ``params.json``; returns Meta's logits for ``tokens``.
- :func:`meta_forward`: Meta's logits for a checkpoint directory (world size = its shard count) or for a
  single-device state dict (world size 1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(mode: str, directory: str, world_size: int, seed: int, timeout: int, port: int) -> list[str]:
    """Runs the ``world_size`` ranks of ``mode`` on ``port``; returns the error reports of failed ranks."""
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), mode, directory, str(seed)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = []
    for rank, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"rank {rank} exited {p.returncode}:\n{err[-3000:]}")
    return errors


def _spawn(mode: str, directory: str, world_size: int, tokens, seed: int = 0, timeout: int = 600) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim == 1:
        tokens = tokens[None]
    tok_file = os.path.join(directory, ".tokens.npy")
    np.save(tok_file, tokens)
    for _attempt in range(3):  # a free port can be taken between our probe and gloo's bind: try another
        errors = _run_ranks(mode, directory, world_size, seed, timeout, _free_port())
        if not any("ddress already in use" in e for e in errors):
            break
    os.remove(tok_file)
    if errors:
        raise RuntimeError("Meta reference failed:\n" + "\n".join(errors))
    logits_file = os.path.join(directory, ".logits.npy")
    logits = np.load(logits_file)
    os.remove(logits_file)
    return logits


def write_meta_checkpoint(
    directory: str, params: dict, world_size: int = 2, tokens=(1, 2, 3), seed: int = 0
) -> np.ndarray:
    """Writes a random float32 Meta checkpoint with ``world_size`` model-parallel shards into ``directory``.

    ``params``: Meta params.json fields (dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of,
    ffn_dim_multiplier, norm_eps, rope_theta, use_scaled_rope). Weights ~ N(0, 0.02^2) (different per shard),
    norm scales ~ 1 + N(0, 0.1^2) (identical on every rank, as replicated parameters are).
    Returns Meta's float32 logits [B, T, V] for int ``tokens`` [B, T] (or [T]).
    """
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    return _spawn("write", directory, world_size, tokens, seed)


def meta_forward(params_json: dict, state_dict_or_ckpt_dir, tokens) -> np.ndarray:
    """Meta's reference float32 logits [B, T, V] for int ``tokens`` [B, T] (or [T]).

    ``state_dict_or_ckpt_dir``: a directory with ``consolidated.NN.pth`` shards (run with world size = their
    count), or a single-device state dict {Meta key: tensor or numpy array} (world size 1).
    ``params_json``: Meta's params.json fields.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(state_dict_or_ckpt_dir, (str, os.PathLike)):
            src = os.fspath(state_dict_or_ckpt_dir)
            world = len([f for f in os.listdir(src) if f.startswith("consolidated.") and f.endswith(".pth")])
            for f in os.listdir(src):
                if f.startswith("consolidated."):
                    os.symlink(os.path.join(os.path.abspath(src), f), os.path.join(tmp, f))
        else:
            import torch

            sd = {
                k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)))
                for k, v in state_dict_or_ckpt_dir.items()
            }
            torch.save(sd, os.path.join(tmp, "consolidated.00.pth"))
            world = 1
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params_json, f)
        return _spawn("forward", tmp, world, tokens)


# ------------------------------------------------------------------------------------------------ worker
def _worker(mode: str, directory: str, seed: int) -> None:
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch
    import torch.distributed as dist
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fs_init.initialize_model_parallel(world)
    with open(os.path.join(directory, "params.json")) as f:
        params = json.load(f)
    tokens = torch.from_numpy(np.load(os.path.join(directory, ".tokens.npy")))
    args = ModelArgs(**params, max_batch_size=tokens.shape[0], max_seq_len=max(64, tokens.shape[1]))
    torch.set_default_dtype(torch.float32)
    model = Transformer(args)
    shard = os.path.join(directory, f"consolidated.{rank:02d}.pth")
    if mode == "write":
        gen_shard = torch.Generator().manual_seed(seed * 1000 + rank + 1)
        gen_repl = torch.Generator().manual_seed(seed * 1000)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen_repl))
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen_shard))
        torch.save(model.state_dict(), shard)
    else:
        model.load_state_dict(torch.load(shard, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    logits = model.forward(tokens, 0)
    if rank == 0:
        np.save(os.path.join(directory, ".logits.npy"), logits.float().numpy())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
