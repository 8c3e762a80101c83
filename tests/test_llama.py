"""The Flax LLaMA against transformers' LlamaForCausalLM, and the KV cache against full forwards.

Tolerances: fp32 logits agree with torch's within 1e-4 absolute (the two differ only in
summation order; the observed gap is ~1e-6 for logits of size O(1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hf_logits, left_padded_batch, make_hf_llama

from icegrt_jax.config import MeshConfig
from icegrt_jax.hf import load_hf, model_from_params
from icegrt_jax.models.llama import (
    LlamaConfig,
    ModelConfigError,
    init_cache,
    preset,
    unstack_layers,
)
from icegrt_jax.models.projections import dense, swiglu_mlp
from icegrt_jax.sharding import Partitioner

VARIANTS = {
    "mha-untied": {"heads": 4, "kv_heads": 4, "tied": False},
    "gqa-tied": {"heads": 4, "kv_heads": 2, "tied": True},
    # transformers 5 saves rope_theta inside rope_parameters only: a base other than the default
    # (CodeLlama's 1e6) must be read from there (measured: theta 5e5 read as 1e4 moves logits by ~5)
    "gqa-theta-1e6": {"heads": 4, "kv_heads": 2, "tied": False, "rope_theta": 1e6},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch_model = make_hf_llama(path, **VARIANTS[request.param])
    cfg, params = load_hf(str(path))
    return torch_model, cfg, params


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers_left_padded(hf_pair, scan_layers):
    torch_model, cfg, params = hf_pair
    model = model_from_params(cfg.replace(scan_layers=scan_layers), params)
    ids, mask = left_padded_batch([9, 4, 1, 7], total=9, vocab=cfg.vocab_size, seed=1)
    ours, _ = jax.jit(lambda t, m: model(t, m))(jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], hf_logits(torch_model, ids, mask)[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per-layer"])
@pytest.mark.parametrize("prefill_keys", ["cache", "prompt"])
def test_kv_cache_decoding_equals_full_forward(hf_pair, per_layer, prefill_keys):
    """Prefill + decode steps through the cache give the full forward's logits (atol 1e-5: fp32,
    only the reduction order differs); the stacked path runs the scanned layers and its stacked
    cache, the per-layer path the sampler's: ``unstack_layers`` weights and a per-layer cache.
    The prefill's key mask covers the whole cache or, as the sampler's, the prompt slots only."""
    _, cfg, params = hf_pair
    model = model_from_params(cfg, params)
    layer_weights = unstack_layers(model.layers, cfg.compute_dtype) if per_layer else None
    ids, mask = left_padded_batch([6, 3], total=6, vocab=cfg.vocab_size, seed=2)
    extra = np.random.default_rng(3).integers(3, cfg.vocab_size, (2, 4))
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    full_logits, _ = model(jnp.asarray(full_ids), jnp.asarray(full_mask))

    cache_len = 16  # larger than needed: unused slots must be masked out
    cache = init_cache(cfg, batch_size=2, max_len=cache_len, per_layer=per_layer)
    key_mask = np.zeros((2, cache_len), np.int32)
    key_mask[:, :6] = mask
    prefill_mask = key_mask if prefill_keys == "cache" else key_mask[:, :6]
    logits, cache = model(jnp.asarray(ids), jnp.asarray(prefill_mask), cache, 0, layer_weights)
    steps = [logits]
    for t in range(extra.shape[1]):
        key_mask[:, 6 + t] = 1
        logits, cache = model(jnp.asarray(extra[:, t:t + 1]), jnp.asarray(key_mask), cache, 6 + t, layer_weights)
        steps.append(logits)
    incremental = np.concatenate([np.asarray(s) for s in steps], axis=1)
    valid = full_mask.astype(bool)
    np.testing.assert_allclose(incremental[valid], np.asarray(full_logits)[valid], atol=1e-5, rtol=0)
    B, S, K, D = 2, cache_len, cfg.num_kv_heads, cfg.head_dim
    if per_layer:
        assert len(cache) == cfg.num_layers
        assert all(c["k"].shape == (B, K, S, D) and c["v"].shape == (B, K, D, S) for c in cache)
    else:
        assert cache["k"].shape == (cfg.num_layers, B, S, K, D)


def test_decode_copy_fuses_qkv_only_where_heads_and_kv_heads_split_alike(hf_pair):
    """``unstack_layers`` fuses gate/up always and q/k/v unless the active rules split heads and
    kv heads differently (then the fused kernel, split by kv heads, would replicate q's part)."""
    _, cfg, params = hf_pair
    layers = model_from_params(cfg, params).layers
    separate = {"wq", "wk", "wv", "w_gate", "w_up"}
    plain = unstack_layers(layers, jnp.float32)[0]
    assert {"wqkv", "w_gate_up"} <= set(plain) and not separate & set(plain)
    one_device = jax.devices()[:1]
    with Partitioner.from_config(MeshConfig(data=1), one_device).activate():
        assert "wqkv" in unstack_layers(layers, jnp.float32)[0]
    rules = [["kv_heads", None] if rule[0] == "kv_heads" else rule for rule in MeshConfig().rules]
    with Partitioner.from_config(MeshConfig(data=1, rules=rules), one_device).activate():
        split = unstack_layers(layers, jnp.float32)[0]
    assert {"wq", "wk", "wv", "w_gate_up"} <= set(split) and "wqkv" not in split


def test_bf16_compute_is_finite_and_close_to_fp32(hf_pair):
    """bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%); through 2 layers the logits stay
    within 5% of the fp32 logits' range, and the greedy choice agrees on >= 90% of positions."""
    _, cfg, params = hf_pair
    ids, mask = left_padded_batch([8, 5, 8], total=8, vocab=cfg.vocab_size, seed=4)
    fp32, _ = model_from_params(cfg, params)(jnp.asarray(ids), jnp.asarray(mask))
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    bf16_cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf16, _ = model_from_params(bf16_cfg, bf16_params)(jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    fp32, bf16 = np.asarray(fp32)[valid], np.asarray(bf16, np.float32)[valid]
    assert np.isfinite(bf16).all()
    scale = fp32.max() - fp32.min()
    assert np.abs(bf16 - fp32).max() <= 0.05 * scale
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gradients_equal_plain(remat):
    cfg = preset("tiny")
    ids, mask = left_padded_batch([5, 3], total=5, vocab=cfg.vocab_size, seed=5)
    from flax import nnx

    from icegrt_jax.models.llama import Llama

    def grads(c):
        graphdef, state = nnx.split(Llama(c, nnx.Rngs(0)))

        def loss(state):
            logits, _ = nnx.merge(graphdef, state)(jnp.asarray(ids), jnp.asarray(mask))
            return jnp.mean(logits ** 2)

        return jax.grad(loss)(state)

    plain, rematted = grads(cfg), grads(cfg.replace(remat=remat))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("remat, kept", [("dots", 6), ("full", 0)])
def test_remat_dots_keeps_the_custom_vjp_projections_outputs(remat, kept):
    """The dots policy cannot see the matmuls inside the custom VJPs; they name their outputs so
    remat="dots" keeps each layer's q, k, v, o, gate and up as it would plain matmuls' (the down
    projection's output is not needed by the backward), and remat="full" none of them."""
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals

    from icegrt_jax.models.llama import Llama

    cfg = preset("tiny").replace(remat=remat, scan_layers=False)
    graphdef, state = nnx.split(Llama(cfg, nnx.Rngs(0)))
    ids, mask = (jnp.asarray(a) for a in left_padded_batch([5, 3], total=5, vocab=cfg.vocab_size, seed=5))

    def loss(state):
        return jnp.mean(nnx.merge(graphdef, state)(ids, mask)[0] ** 2)

    named = [shape for shape, why in saved_residuals(loss, state) if "named 'projection'" in why]
    assert len(named) == kept * cfg.num_layers
    assert sum(shape.shape[-1] == cfg.intermediate_size for shape in named) == (2 * cfg.num_layers if kept else 0)


def swiglu_by_formula(h, w_gate, w_up, w_down):
    return jnp.einsum("bti,ih->bth", jax.nn.silu(h @ w_gate) * (h @ w_up), w_down)


WRITTEN_OUT_BACKWARDS = {  # name: (function, its formula for autodiff, argument shapes, cotangent shape)
    "swiglu_mlp": (swiglu_mlp, swiglu_by_formula, [(2, 5, 8), (8, 12), (8, 12), (12, 8)], (2, 5, 8)),
    "dense_widening": (dense, lambda x, w: x @ w, [(2, 5, 8), (8, 12)], (2, 5, 12)),  # dW = x^T dy
    "dense_narrowing": (dense, lambda x, w: x @ w, [(2, 5, 12), (12, 8)], (2, 5, 8)),  # dW = (dy^T x)^T
    "dense_fp32_out": (lambda x, w: dense(x, w, jnp.float32),
                       lambda x, w: jnp.einsum("bti,io->bto", x, w, preferred_element_type=jnp.float32),
                       [(2, 5, 8), (8, 12)], (2, 5, 12)),
}


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("name", sorted(WRITTEN_OUT_BACKWARDS))
def test_written_out_backward_equals_autodiff_of_the_formula(name, dtype, tolerance):
    """The model's custom VJPs (``swiglu_mlp``, ``dense`` both ways round ``weight_gradient``, with
    an fp32 result) against jax's autodiff of their formulas: fp32 to reduction order (rtol
    1e-5); bf16 within 2e-2 relative to each gradient's scale (swiglu's elementwise gradient
    runs in fp32, autodiff's in bf16: they round differently). Same output, same dtypes."""
    function, formula, shapes, cotangent_shape = WRITTEN_OUT_BACKWARDS[name]
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=shape) * (1.0 if i == 0 else 0.5), dtype) for i, shape in enumerate(shapes)]
    out, custom_vjp = jax.vjp(function, *args)
    expected_out, formula_vjp = jax.vjp(formula, *args)
    assert out.dtype == expected_out.dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected_out, np.float32))
    cotangent = jnp.asarray(rng.normal(size=cotangent_shape), out.dtype)
    for got, expected in zip(custom_vjp(cotangent), formula_vjp(cotangent), strict=True):
        assert got.dtype == expected.dtype == dtype and got.shape == expected.shape
        got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


def test_written_out_backward_gives_each_input_its_own_dtype():
    """bf16 activations with fp32 weights (and the reverse): each cotangent in its input's dtype."""
    rng = np.random.default_rng(1)
    for act, weight in ((jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)):
        h = jnp.asarray(rng.normal(size=(2, 3, 8)), act)
        weights = [jnp.asarray(rng.normal(size=shape), weight) for shape in ((8, 12), (8, 12), (12, 8))]
        for function, args in ((swiglu_mlp, (h, *weights)), (dense, (h, weights[0]))):
            out, vjp = jax.vjp(function, *args)
            grads = vjp(jnp.ones_like(out))
            assert [g.dtype for g in grads] == [a.dtype for a in args], function


def test_every_parameter_has_logical_axes():
    from flax import nnx

    from icegrt_jax.hf import abstract_model

    _, state = abstract_model(preset("tiny"))
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("sharding_names") or var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.get_value().ndim, path


def test_config_roundtrip_and_presets():
    for name in ["tiny", "llama-7b", "llama2-70b", "vicuna-13b-v1.5"]:
        cfg = preset(name)
        assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()).replace(dtype=cfg.dtype) == cfg
    assert abs(preset("llama-7b").num_params() - 6.74e9) < 0.01e9
    assert abs(preset("llama2-70b").num_params() - 68.98e9) < 0.05e9
    with pytest.raises(ModelConfigError, match="num_kv_heads"):
        preset("tiny", num_kv_heads=3)
    with pytest.raises(ModelConfigError, match="unknown model preset"):
        preset("gpt5")
