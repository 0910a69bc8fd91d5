"""Issue 2: the model equals Hugging Face transformers and Meta's reference; configs; parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import llama_jax
from llama_jax.config import PRESETS, LlamaConfig, RopeScaling
from llama_jax.model import Llama
from llama_jax.rope import inverse_frequencies
from tests.numerics import assert_logits_close
from tests.reference import LLAMA31_SCALING, hf_model, randomize, tiny_config


def _ours_and_hf(config, seed=0):
    model = randomize(Llama(config, rngs=nnx.Rngs(seed), param_dtype=jnp.float32), seed)
    return model, hf_model(model)


def _compare(model, hf, tokens, positions=None):
    ours = np.asarray(model(jnp.asarray(tokens), None if positions is None else jnp.asarray(positions)))
    kwargs = {} if positions is None else {"position_ids": torch.from_numpy(np.asarray(positions, np.int64))}
    with torch.no_grad():
        ref = hf(torch.from_numpy(np.asarray(tokens, np.int64)), **kwargs).logits.numpy()
    assert ours.shape == ref.shape and ours.dtype == np.float32
    return ours, ref


CASES = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa": dict(n_heads=8, n_kv_heads=2),
    "mqa": dict(n_heads=8, n_kv_heads=1),
    "tied": dict(n_heads=8, n_kv_heads=2, tie_word_embeddings=True),
    # head_dim 16, theta 500000: wavelengths 6 .. 2e5 span all three Llama 3.1 scaling bands
    "llama31_scaling": dict(dim=64, n_heads=4, n_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA31_SCALING),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name):
    config = tiny_config(**CASES[name])
    model, hf = _ours_and_hf(config, seed=len(name))
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 64))
    ours, ref = _compare(model, hf, tokens)
    assert np.max(np.abs(ref)) > 1.0, "logits too small for the comparison to mean anything"
    assert_logits_close(ours, ref, config.dim, config.n_layers, name)  # float32 rounding at D, L (numerics.py)


def test_scaling_bands_all_present_in_parity_config():
    c = tiny_config(**CASES["llama31_scaling"])
    plain = inverse_frequencies(c.head_dim, c.rope_theta)
    scaled = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    unchanged = np.isclose(scaled, plain, rtol=0, atol=0).sum()
    divided = np.isclose(scaled, plain / 8, rtol=1e-6).sum()
    assert unchanged > 0 and divided > 0 and unchanged + divided < len(plain)


def test_logits_match_transformers_at_long_positions():
    """Positions 131000..131071 passed explicitly: where Llama 3.1 scaling matters most."""
    config = tiny_config(**CASES["llama31_scaling"])
    model, hf = _ours_and_hf(config, seed=3)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 72))
    positions = np.broadcast_to(np.arange(131000, 131072, dtype=np.int32), tokens.shape)
    ours, ref = _compare(model, hf, tokens, positions)
    assert_logits_close(ours, ref, config.dim, config.n_layers, "positions 131000..")  # float32 rounding at D, L
    # and scaling really changes the result there (a silently ignored rope_scaling would fail here)
    unscaled = randomize(Llama(config.replace(rope_scaling=None), rngs=nnx.Rngs(3), param_dtype=jnp.float32), 3)
    other = np.asarray(unscaled(jnp.asarray(tokens), jnp.asarray(positions)))
    assert np.max(np.abs(other - np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions))))) > 1e-2


def test_rope_cases_from_shared_rope_md():
    freqs = inverse_frequencies(128, 500000.0)
    scaled = inverse_frequencies(128, 500000.0, LLAMA31_SCALING)
    assert (scaled == freqs).sum() == 29
    assert np.isclose(scaled, freqs / 8, rtol=1e-6).sum() == 29
    np.testing.assert_allclose(freqs[-1], 2.4551e-6, rtol=1e-4)
    np.testing.assert_allclose(scaled[-1], 3.0689e-7, rtol=1e-4)
    s32 = inverse_frequencies(64, 500000.0, RopeScaling(factor=32.0))
    f32 = inverse_frequencies(64, 500000.0)
    assert (s32 == f32).sum() == 15 and np.isclose(s32, f32 / 32, rtol=1e-6).sum() == 14


def test_rope_positions_stay_exact_in_bf16_activations():
    """Angles come from int32 positions in float32 even when activations are bf16 (bf16 would merge 256/257)."""
    from llama_jax.rope import apply_rope

    c = tiny_config()
    x = jnp.ones((1, 2, 1, c.head_dim), jnp.bfloat16)
    out = apply_rope(x, jnp.array([[256, 257]], jnp.int32), c)
    assert not np.array_equal(np.asarray(out[0, 0], np.float32), np.asarray(out[0, 1], np.float32))


@pytest.mark.parametrize(
    "name,count", [("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496), ("llama3.1-405b", 405_853_388_800)]
)
def test_parameter_counts_from_eval_shape(name, count):
    abstract = nnx.eval_shape(lambda: Llama(PRESETS[name], rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert sum(int(np.prod(x.shape)) for x in leaves) == count == PRESETS[name].num_params()


def test_every_parameter_has_logical_axes():
    model = Llama(tiny_config(), rngs=nnx.Rngs(0))
    vocab = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "layers"}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata()["out_sharding"]
            assert len(axes) == var.ndim and set(axes) <= vocab, (path, axes)


def test_scan_compiles_independently_of_depth():
    """Stacked layers: the jaxpr of a 2-layer and a 16-layer model have the same size."""
    sizes = []
    for layers in (2, 16):
        model = Llama(tiny_config(n_layers=layers), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def fn(s, t, graphdef=graphdef):  # traced at once, in this iteration
            return nnx.merge(graphdef, s)(t)

        sizes.append(len(list(_equations(jax.make_jaxpr(fn)(state, jnp.zeros((1, 4), jnp.int32)).jaxpr))))
    assert sizes[0] == sizes[1]


def _equations(jaxpr):
    """Every equation of a jaxpr, recursing into sub-jaxprs (scan bodies, remat, pjit)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_gqa_never_tiles_kv():
    """Attention contracts grouped queries [B,K,G,T,H] with the K un-repeated keys [B,K,S,H] (the blockwise
    layout; the einsum oracle's [B,T,K,G,H] x [B,S,K,H] is accepted too); nothing of shape [B,S,N,H] or [B,N,S,H]
    (K/V tiled per query head) is ever built."""
    config = tiny_config(dim=64, n_heads=4, n_kv_heads=2)  # head_dim 16, G = 2
    model = Llama(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.zeros((1, 5), jnp.int32)).jaxpr
    dots = [
        frozenset(tuple(v.aval.shape) for v in e.invars) for e in _equations(jaxpr) if e.primitive.name == "dot_general"
    ]
    grouped = (frozenset({(1, 2, 2, 5, 16), (1, 2, 5, 16)}), frozenset({(1, 5, 2, 2, 16), (1, 5, 2, 16)}))
    assert any(g in dots for g in grouped), dots
    k_shaped = [
        e
        for e in _equations(jaxpr)
        if any(tuple(v.aval.shape) in ((1, 5, 4, 16), (1, 4, 5, 16)) for v in e.outvars)
        and e.primitive.name in ("broadcast_in_dim", "gather", "tile")
    ]
    assert not k_shaped


def test_unstacked_layers_give_the_same_logits():
    model = randomize(Llama(tiny_config(), rngs=nnx.Rngs(0)), 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 10)))
    ref = np.asarray(model(tokens))
    model.unstack_layers()
    assert_logits_close(np.asarray(model(tokens)), ref, 64, 2, "unstacked")  # same math, other fusion: rounding
    model.stack_layers()
    np.testing.assert_array_equal(np.asarray(model(tokens)), ref)


def test_default_dtype_is_float32_on_cpu():
    model = Llama(tiny_config(), rngs=nnx.Rngs(0))
    assert model.param_dtype == jnp.float32 and model.dtype == jnp.float32
    assert model(jnp.zeros((1, 3), jnp.int32)).dtype == jnp.float32
    bf = Llama(tiny_config(), rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert bf.embedder.embedding.dtype == jnp.bfloat16
    assert bf(jnp.zeros((1, 3), jnp.int32)).dtype == jnp.float32  # logits always float32


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(dim=65, n_heads=8), "n_heads"),
        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads"),
        (dict(dim=0), "dim"),
        (dict(n_layers=-1), "n_layers"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_dim=0), "hidden_dim"),
        (dict(norm_eps=0.0), "norm_eps"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**changes)


def _hf_dict(**changes):
    d = tiny_config(rope_scaling=LLAMA31_SCALING).to_hf_config()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(rope_scaling={"type": "dynamic", "factor": 4.0}), "dynamic"),
        (dict(num_attention_heads=8, num_key_value_heads=3), "n_kv_heads"),
    ],
)
def test_bad_hf_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        LlamaConfig.from_hf_config(_hf_dict(**changes))


def test_hf_config_round_trip_and_legacy_type_key():
    c = tiny_config(rope_scaling=LLAMA31_SCALING, tie_word_embeddings=True)
    assert LlamaConfig.from_hf_config(c.to_hf_config()) == c
    legacy = c.to_hf_config()
    legacy["rope_scaling"] = dict(legacy["rope_scaling"])
    legacy["rope_scaling"]["type"] = legacy["rope_scaling"].pop("rope_type")
    assert LlamaConfig.from_hf_config(legacy) == c
    import transformers

    hf = transformers.LlamaConfig(**c.to_hf_config())  # transformers reads our dict as it is
    assert LlamaConfig.from_hf_config(hf.to_dict()) == c


def test_meta_params():
    params = {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.3,
        "multiple_of": 1024,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    assert LlamaConfig.from_meta_params(params) == PRESETS["llama3.1-8b"]
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaConfig.from_meta_params({**params, "vocab_size": -1})
    with pytest.raises(ValueError, match="dim"):
        LlamaConfig.from_meta_params({k: v for k, v in params.items() if k != "dim"})
    for name in ("llama3.1-8b", "llama3.1-70b", "llama3.1-405b"):
        c = PRESETS[name]
        assert LlamaConfig.from_meta_params(c.to_meta_params()) == c


def test_public_api():
    assert llama_jax.LlamaConfig is LlamaConfig and llama_jax.Llama is Llama
    with pytest.raises(ValueError, match="known"):
        llama_jax.get_preset("llama9")


def test_logits_match_metas_reference_transformer():
    """Meta's own llama_models.llama3.model.Transformer (fairscale, gloo, world size 1, float32), GQA with
    Llama 3.1 scaling (Meta's fixed constants), same weights."""
    from tests.meta_reference import meta_forward
    from tests.reference import meta_state_dict

    config = tiny_config(
        dim=64, n_heads=4, n_kv_heads=2, hidden_dim=192, rope_theta=500000.0, rope_scaling=LLAMA31_SCALING
    )
    model = randomize(Llama(config, rngs=nnx.Rngs(7), param_dtype=jnp.float32), 7)
    params = config.to_meta_params()
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 64))
    ref = meta_forward(params, meta_state_dict(model), tokens)
    ours = np.asarray(model(jnp.asarray(tokens)))
    assert np.max(np.abs(ref)) > 1.0
    assert_logits_close(ours, ref, config.dim, config.n_layers, "Meta reference")  # float32 rounding at D, L
