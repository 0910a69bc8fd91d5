"""Meta native <-> llama-jax: a genuinely model-parallel checkpoint written by Meta's reference code (2 gloo
processes, fairscale MP 2, GQA, use_scaled_rope, float32) converts with logits parity; Meta -> Orbax -> Meta is
bitwise; 405B-style duplicated KV heads, Llama 2 embedding layout; bad inputs and safety."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl import flags as absl_flags

from conversions import __main__ as cli
from conversions.__main__ import convert_from_flags
from conversions.common import ConversionError
from llama_jax import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from meta_reference import meta_forward, write_meta_checkpoint  # noqa: E402

from tests.numerics import assert_logits_close  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = dict(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=256,
    multiple_of=32,
    ffn_dim_multiplier=None,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
)
TOKENS = [[1, 5, 9, 200, 3, 7, 11, 2, 100, 17, 4, 250]]
SIZE = (PARAMS["dim"], PARAMS["n_layers"])
CAT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}


@pytest.fixture(scope="module")
def meta2(tmp_path_factory):
    """(directory, Meta's logits) of a 2-shard checkpoint written by Meta's reference under gloo."""
    d = str(tmp_path_factory.mktemp("meta") / "mp2")
    logits = write_meta_checkpoint(d, PARAMS, world_size=2, tokens=TOKENS)
    return d, logits


def _merge(d):
    sds = [torch.load(os.path.join(d, f"consolidated.{i:02d}.pth"), weights_only=True) for i in range(2)]
    out = {}
    for k in sds[0]:
        kind = k.split(".")[-2]
        out[k] = torch.cat([s[k] for s in sds], CAT[kind]) if kind in CAT else sds[0][k]
    return out


def _logits(ckpt):
    return np.asarray(checkpoint.load(ckpt, dtype=jnp.float32)(jnp.array(TOKENS, jnp.int32)))


def _run_cli(*flags):
    """The CLI in-process: returns its exit status (absl flags parsed like the console script)."""
    argv = ["llama-jax-convert", "--noprogress", *flags]
    fv = cli.define_flags(absl_flags.FlagValues())  # private flag set: nothing global is touched
    fv(argv)
    try:
        cli.main(argv[:1], fv)
    except SystemExit as e:
        return e.code
    return 0


def test_meta_mp2_logits_match_meta_reference(meta2, tmp_path):
    src, ref = meta2
    out = convert_from_flags("meta", src, str(tmp_path / "ours"), progress=False)
    cfg = checkpoint.read_config(out)
    assert (cfg.n_kv_heads, cfg.vocab_size, cfg.rope_scaling is not None) == (2, 256, True)
    ours = _logits(out)
    assert_logits_close(ours, ref, *SIZE, "Meta MP2")  # float32 rounding at D, L


def test_meta_round_trip_bitwise_and_reference_runs_export(meta2, tmp_path):
    src, ref = meta2
    out = convert_from_flags("meta", src, str(tmp_path / "ours"), progress=False)
    back = convert_from_flags("orbax", out, str(tmp_path / "back"), target="meta", progress=False)
    merged = _merge(src)
    exported = torch.load(os.path.join(back, "consolidated.00.pth"), weights_only=True)
    assert merged.keys() == exported.keys()
    for k in merged:
        assert merged[k].dtype == exported[k].dtype and torch.equal(merged[k], exported[k]), k
    params = json.load(open(os.path.join(back, "params.json")))
    # MP1 vs MP2 reference runs: other reduction order, float32 rounding at D, L
    assert_logits_close(meta_forward(params, back, TOKENS), ref, *SIZE, "Meta export through Meta's reference")
    # and the single exported shard converts back to identical parameters
    again = convert_from_flags("meta", back, str(tmp_path / "again"), progress=False)
    for name in ("embedder.embedding", "layers.attention.q_proj", "layers.attention.k_proj", "lm_head"):
        np.testing.assert_array_equal(checkpoint.read_param(out, name), checkpoint.read_param(again, name))


def _save_shards(d, shards, params):
    os.makedirs(d, exist_ok=True)
    for i, sd in enumerate(shards):
        torch.save(sd, os.path.join(d, f"consolidated.{i:02d}.pth"))
    json.dump(params, open(os.path.join(d, "params.json"), "w"))


def _split(merged, n, kv_dup=False, emb_dim=0, head_dim=16):
    shards = [{} for _ in range(n)]
    for k, v in merged.items():
        kind = k.split(".")[-2]
        if kv_dup and kind in ("wk", "wv"):
            heads = v.reshape(-1, head_dim, v.shape[1])
            v = heads.repeat_interleave(2, dim=0).reshape(-1, v.shape[1])
        dim = emb_dim if kind == "tok_embeddings" else CAT.get(kind)
        for i in range(n):
            shards[i][k] = v.chunk(n, dim)[i].clone() if dim is not None else v.clone()
    return shards


def test_mp4_duplicated_kv_heads_and_llama2_embedding_layout(meta2, tmp_path):
    src, ref = meta2
    merged = _merge(src)
    # 405B-MP16-style: 4 shards, one KV head each, every real KV head stored twice; params.json says 4 KV heads
    _save_shards(tmp_path / "mp4", _split(merged, 4, kv_dup=True), dict(PARAMS, n_kv_heads=4))
    out = convert_from_flags("meta", str(tmp_path / "mp4"), str(tmp_path / "ours4"), progress=False)
    assert checkpoint.read_config(out).n_kv_heads == 2
    assert_logits_close(_logits(out), ref, *SIZE, "MP4 duplicated KV heads")  # float32 rounding at D, L
    # a pair that is not identical is refused
    shards = _split(merged, 4, kv_dup=True)
    shards[1]["layers.1.attention.wv.weight"][0, 0] += 1
    _save_shards(tmp_path / "mp4bad", shards, dict(PARAMS, n_kv_heads=4))
    with pytest.raises(ConversionError, match="layers.1.attention.wv.weight.*not pairwise identical"):
        convert_from_flags("meta", str(tmp_path / "mp4bad"), str(tmp_path / "bad"), progress=False)
    assert not os.path.exists(tmp_path / "bad")
    # Llama 2 layout: the embedding split on the model dimension
    _save_shards(tmp_path / "l2", _split(merged, 2, emb_dim=1), PARAMS)
    out2 = convert_from_flags("meta", str(tmp_path / "l2"), str(tmp_path / "ours2"), progress=False)
    assert_logits_close(_logits(out2), ref, *SIZE, "Llama 2 embedding layout")  # float32 rounding at D, L


def _bad_copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _expect_bad(tmp_path, source, inp, match, exc=ConversionError, **kw):
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        convert_from_flags(source, inp, str(out), progress=False, **kw)
    assert _run_cli(f"--source={source}", f"--input={inp}", f"--output={out}") == 1
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out")], os.listdir(tmp_path)


def test_bad_meta_inputs(meta2, tmp_path, capsys):
    src, _ = meta2
    d = _bad_copy(src, tmp_path / "missing")
    os.remove(os.path.join(d, "consolidated.01.pth"))
    _expect_bad(tmp_path, "meta", d, r"consolidated\.01\.pth: missing shard", FileNotFoundError)
    assert "consolidated.01.pth" in capsys.readouterr().err

    d = _bad_copy(src, tmp_path / "shapes")
    sd = torch.load(os.path.join(d, "consolidated.01.pth"), weights_only=True)
    sd["layers.1.feed_forward.w3.weight"] = sd["layers.1.feed_forward.w3.weight"][:-8]
    torch.save(sd, os.path.join(d, "consolidated.01.pth"))
    _expect_bad(
        tmp_path,
        "meta",
        d,
        r"consolidated\.01\.pth: tensor layers\.1\.feed_forward\.w3\.weight has shape"
        r".*inconsistent shapes",
    )

    for field, value in (("vocab_size", 128003), ("n_kv_heads", 4), ("dim", 128)):
        d = _bad_copy(src, tmp_path / f"params_{field}")
        json.dump(dict(PARAMS, **{field: value}), open(os.path.join(d, "params.json"), "w"))
        _expect_bad(tmp_path, "meta", d, rf"params\.json: field '{field}'={value} disagrees")

    d = _bad_copy(src, tmp_path / "trunc")
    p = os.path.join(d, "consolidated.00.pth")
    os.truncate(p, os.path.getsize(p) // 2)
    _expect_bad(tmp_path, "meta", d, r"consolidated\.00\.pth: cannot read PyTorch checkpoint, truncated")


class _Payload:
    """Unpickling this calls open(path, 'w'): it creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_refused_and_file_not_created(meta2, tmp_path):
    src, _ = meta2
    proof, target = tmp_path / "proof_created", tmp_path / "pwned"
    torch.save({"x": _Payload(str(proof))}, tmp_path / "proof.pth")
    # the payload is real: an unrestricted unpickler does create the file
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(tmp_path / 'proof.pth')!r}, weights_only=False)"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert proof.exists()
    d = _bad_copy(src, tmp_path / "evil")
    sd = torch.load(os.path.join(d, "consolidated.00.pth"), weights_only=True)
    sd["norm.weight"] = _Payload(str(target))
    torch.save(sd, os.path.join(d, "consolidated.00.pth"))
    _expect_bad(tmp_path, "meta", d, r"consolidated\.00\.pth: refused to unpickle")
    assert not target.exists()


def test_bad_hf_and_existing_output(meta2, tmp_path):
    from test_convert_hf import _hf_model

    hf, _ = _hf_model(tmp_path, tied=False)
    p = os.path.join(hf, "model.safetensors")
    os.truncate(p, os.path.getsize(p) - 1000)
    _expect_bad(tmp_path, "hf", hf, r"model\.safetensors: .*truncated")

    src, _ = meta2
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="exists"):
        convert_from_flags("meta", src, str(out), progress=False)
    assert _run_cli("--source=meta", f"--input={src}", f"--output={out}") == 1
    assert os.listdir(out) == ["keep"]
    assert _run_cli("--source=meta", f"--input={src}", f"--output={out}", "--overwrite") == 0
    assert checkpoint.read_config(out).dim == 64 and not os.path.exists(out / "keep")


def test_interrupted_conversion_leaves_nothing_and_rerun_completes(meta2, tmp_path, monkeypatch):
    from conversions.meta import MetaSource

    src, ref = meta2
    out = str(tmp_path / "ck")
    real = MetaSource.layer_tensors

    def interrupted(self, i):
        if i == 1:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(MetaSource, "layer_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_from_flags("meta", src, out, progress=False)
    assert os.listdir(tmp_path) == []
    # a hard kill cannot clean up: its temporary directory is not a checkpoint, and the output does not exist
    writer = checkpoint.CheckpointWriter(out, _cfg())
    stale = writer.tmp
    with pytest.raises(FileNotFoundError):
        checkpoint.load(out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load(stale)
    monkeypatch.setattr(MetaSource, "layer_tensors", real)
    convert_from_flags("meta", src, out, progress=False)
    assert_logits_close(_logits(out), ref, *SIZE, "rerun after a kill")  # float32 rounding at D, L


def _cfg():
    from llama_jax.config import LlamaConfig

    return LlamaConfig.from_meta_params(PARAMS)


def test_console_entry_point_help_and_usage():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from conversions.__main__ import run; "
            "sys.argv=['llama-jax-convert', '--source=meta', '--input=/nonexistent', "
            "'--output=/tmp/never_written_llama_jax']; run()",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 1 and "/nonexistent" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists("/tmp/never_written_llama_jax")
