"""llama_jax.checkpoint: save/load round trips, streaming writer, sharded restore, incomplete directories."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import checkpoint
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.model import Llama

CFG = LlamaConfig(
    vocab_size=256,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    hidden_dim=128,
    rope_scaling=RopeScaling(),
    max_seq_len=4096,
)
TOKENS = jnp.array([[1, 5, 9, 200, 3, 7, 11, 2]], jnp.int32)


def _model(seed=0, **kw):
    return Llama(CFG, rngs=nnx.Rngs(seed), param_dtype=jnp.float32, **kw)


def _params(model):
    return {
        ".".join(map(str, p)): np.asarray(v)
        for p, v in checkpoint._flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    }


def test_save_load_round_trip_bitwise(tmp_path):
    model = _model()
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"fake tokenizer")
    out = checkpoint.save(tmp_path / "ck", model, tokenizer_files=[tok])
    assert checkpoint.read_config(out) == CFG
    assert open(os.path.join(checkpoint.tokenizer_dir(out), "tokenizer.model"), "rb").read() == b"fake tokenizer"
    loaded = checkpoint.load(out, dtype=jnp.float32)
    a, b = _params(model), _params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(model(TOKENS), loaded(TOKENS))
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_load_casts_dtype_and_tied_and_unstacked(tmp_path):
    cfg = CFG.replace(tie_word_embeddings=True)
    model = Llama(cfg, rngs=nnx.Rngs(3), param_dtype=jnp.float32)
    ref = model(TOKENS)
    model.unstack_layers()
    checkpoint.save(tmp_path / "ck", model)
    assert checkpoint.tokenizer_dir(tmp_path / "ck") is None
    loaded = checkpoint.load(tmp_path / "ck", dtype=jnp.bfloat16)
    assert loaded.embedder.embedding[...].dtype == jnp.bfloat16
    assert not hasattr(loaded, "lm_head")
    np.testing.assert_array_equal(
        np.asarray(loaded.embedder.embedding[...]), np.asarray(model.embedder.embedding[...].astype(jnp.bfloat16))
    )
    np.testing.assert_array_equal(ref, checkpoint.load(tmp_path / "ck", dtype=jnp.float32)(TOKENS))


def test_streaming_writer_matches_orbax_save(tmp_path):
    model = _model(1)
    checkpoint.save(tmp_path / "orbax", model)
    params = _params(model)
    with checkpoint.CheckpointWriter(tmp_path / "stream", CFG, dtype=jnp.float32) as w:
        for name, value in params.items():
            if name.startswith("layers."):
                for i in range(CFG.n_layers):
                    w.write(name, value[i], layer=i)
            else:
                w.write(name, value)
        w.commit()
    meta = [json.load(open(tmp_path / d / "params" / "_METADATA"))["tree_metadata"] for d in ("orbax", "stream")]
    assert meta[0] == meta[1]
    loaded = _params(checkpoint.load(tmp_path / "stream", dtype=jnp.float32))
    for k in params:
        np.testing.assert_array_equal(params[k], loaded[k], err_msg=k)


def test_streaming_writer_incomplete_or_interrupted_leaves_nothing(tmp_path):
    out = tmp_path / "ck"
    with checkpoint.CheckpointWriter(out, CFG) as w:
        w.write("embedder.embedding", np.zeros((256, 64), np.float32))
        with pytest.raises(ValueError, match="layers.attention.q_proj"):
            w.commit()
    with pytest.raises(RuntimeError):
        with checkpoint.CheckpointWriter(out, CFG) as w:
            w.write("final_norm.scale", np.ones(64))
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        checkpoint.load(out)
    with checkpoint.CheckpointWriter(out, CFG) as w:
        with pytest.raises(ValueError, match="layers.mlp.up_proj: got shape"):
            w.write("layers.mlp.up_proj", np.zeros((64, 64)), layer=0)
        with pytest.raises(KeyError, match="nope"):
            w.write("nope", np.zeros(3))


def test_overwrite(tmp_path):
    checkpoint.save(tmp_path / "ck", _model(0))
    with pytest.raises(FileExistsError, match="ck"):
        checkpoint.save(tmp_path / "ck", _model(1))
    with pytest.raises(FileExistsError, match="ck"):
        checkpoint.CheckpointWriter(tmp_path / "ck", CFG)
    model = _model(1)
    checkpoint.save(tmp_path / "ck", model, overwrite=True)
    np.testing.assert_array_equal(model(TOKENS), checkpoint.load(tmp_path / "ck", dtype=jnp.float32)(TOKENS))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_incomplete_directories_named(tmp_path):
    out = checkpoint.save(tmp_path / "ck", _model())
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        checkpoint.load(tmp_path / "missing_dir")
    os.rename(os.path.join(out, "params", "layers.mlp.up_proj"), tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="layers.mlp.up_proj"):
        checkpoint.load(out)
    os.rename(tmp_path / "moved", os.path.join(out, "params", "layers.mlp.up_proj"))
    os.remove(os.path.join(out, "params", "_METADATA"))
    with pytest.raises(FileNotFoundError, match="_METADATA"):
        checkpoint.load(out)
    os.remove(os.path.join(out, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load(out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.read_config(out)


def test_config_disagreeing_with_arrays(tmp_path):
    out = checkpoint.save(tmp_path / "ck", _model())
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["hidden_dim"] = 96
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(ValueError, match="layers.mlp"):
        checkpoint.load(out)


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from llama_jax import checkpoint
    from llama_jax.config import LlamaConfig
    from llama_jax.model import Llama
    cfg = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128)
    model = Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    checkpoint.save(sys.argv[1], model)
    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"))
    loaded = checkpoint.load(sys.argv[1], dtype=jnp.float32, mesh=mesh)
    q = loaded.layers.attention.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q.sharding
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 1, 16)
    a = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    b = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    print("OK")
""")


def test_sharded_restore_on_8_devices(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
