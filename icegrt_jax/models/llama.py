"""LLaMA decoder in Flax NNX with a functional KV cache.

Numerically follows transformers' ``LlamaForCausalLM``: RMSNorm computed in fp32, RoPE in the
rotate-half layout, SwiGLU MLP, grouped-query attention. Layer parameters are stacked along a
leading ``layers`` axis, so the same parameters run either under ``jax.lax.scan`` (compile time
flat in depth) or as an unrolled Python loop (``scan_layers=False``).

Attention masking is driven by one rule for every mode (full forward, prefill, decode):
query slot ``q`` may attend key slot ``k`` iff ``k <= q`` and ``key_mask[k] == 1``. Without a cache
the slots are the token positions; with a cache they are cache slots, and the caller passes the
mask over the first S slots, S >= cache_index + T (the whole cache; a prefill from slot 0 may pass
the prompt block only, and attention then reads those slots only). Position ids are ``cumsum(key_mask) - 1`` read at the query slots, so
left padding needs no special handling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from icegrt_jax.models.llama_config import (  # noqa: F401 - the config's public names stay importable from here
    DTYPES,
    PRESETS,
    REMAT_POLICIES,
    LlamaConfig,
    ModelConfigError,
    preset,
    read_config_json,
)
from icegrt_jax.models.projections import PROJECTION, dense, swiglu_mlp
from icegrt_jax.sharding import shards_alike, with_logical_constraint

# The residual stream [B, T, H] under a mesh: rows split like the batch, hidden replicated
# (its parameter axis "embed" is FSDP-sharded, the activation is not).
RESIDUAL_AXES = ("batch", "length", None)
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")  # the KV cache's k and v
LAYER_CACHE_AXES = {"k": ("batch", "kv_heads", "length", "head_dim"),  # one layer's head-major cache
                    "v": ("batch", "kv_heads", "head_dim", "length")}


# --- parameters ------------------------------------------------------------------------------

def _param(rngs: nnx.Rngs, shape, axes, cfg: LlamaConfig, init="normal", fan_in=None):
    """A parameter of ``param_dtype`` carrying its logical axis names (no eager sharding)."""
    dtype = DTYPES[cfg.param_dtype]
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        std = 0.02 if fan_in is None else fan_in ** -0.5
        value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape)).astype(dtype)
    return nnx.Param(value, sharding_names=axes, eager_sharding=False)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading ``layers`` axis.

    Kernels are stored as ``x @ W`` with heads split out: wq [L, H, N, D], wk/wv [L, H, K, D],
    wo [L, N, D, H], w_gate/w_up [L, H, I], w_down [L, I, H].
    """

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        L, H, I, D = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        N, K = cfg.num_heads, cfg.num_kv_heads
        self.attn_norm = _param(rngs, (L, H), ("layers", "norm"), cfg, "ones")
        self.wq = _param(rngs, (L, H, N, D), ("layers", "embed", "heads", "head_dim"), cfg, fan_in=H)
        self.wk = _param(rngs, (L, H, K, D), ("layers", "embed", "kv_heads", "head_dim"), cfg, fan_in=H)
        self.wv = _param(rngs, (L, H, K, D), ("layers", "embed", "kv_heads", "head_dim"), cfg, fan_in=H)
        self.wo = _param(rngs, (L, N, D, H), ("layers", "heads", "head_dim", "embed"), cfg, fan_in=N * D)
        self.mlp_norm = _param(rngs, (L, H), ("layers", "norm"), cfg, "ones")
        self.w_gate = _param(rngs, (L, H, I), ("layers", "embed", "mlp"), cfg, fan_in=H)
        self.w_up = _param(rngs, (L, H, I), ("layers", "embed", "mlp"), cfg, fan_in=H)
        self.w_down = _param(rngs, (L, I, H), ("layers", "mlp", "embed"), cfg, fan_in=I)


class Backbone(nnx.Module):
    """The decoder every model here shares: ``embed``, ``layers``, ``final_norm`` (HF's
    ``model.*``), created in this order so a head added after them never changes their init."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        self.layers = DecoderLayers(cfg, rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), cfg, "ones")

    def hidden_states(self, tokens, key_mask, cache=None, cache_index=0, layer_weights=None):
        """Final-norm hidden states [B, T, H] and the updated cache. ``layer_weights``: the
        per-layer copy from ``unstack_layers`` to run instead of the stacked parameters."""
        weights = stacked_weights(self.layers) if layer_weights is None else layer_weights
        return decoder_forward(self.cfg, self.embed[...], weights, self.final_norm[...],
                               tokens, key_mask, cache, cache_index)


class Llama(Backbone):
    """LLaMA causal LM. ``__call__`` returns ``(logits, new_cache)``; see the module docstring."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        super().__init__(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg, fan_in=cfg.hidden_size
            )

    def lm_head_kernel(self) -> jax.Array:
        """[hidden, vocab] output projection (the transposed embedding when tied)."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden) -> jax.Array:
        """fp32 logits [..., V] of ``hidden`` [..., H] (the LM head in the compute dtype)."""
        return dense(hidden, self.lm_head_kernel().astype(self.cfg.compute_dtype), jnp.float32)

    def __call__(self, tokens, key_mask, cache=None, cache_index=0, layer_weights=None):
        hidden, cache = self.hidden_states(tokens, key_mask, cache, cache_index, layer_weights)
        return self.logits(hidden), cache


# --- pure building blocks ---------------------------------------------------------------------

def rms_norm(x, weight, eps):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32, result in x's dtype (as HF)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_cos_sin(positions, head_dim, theta):
    """cos, sin [B, T, D] of angle p * theta^(-2i/D), duplicated over both halves (HF layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]; x is [B, T, heads, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


# Layouts of k and v for ``attention`` (einsum letters: b batch, s key slot, k kv head, d head dim).
# "head_major" puts each matmul's contracted axis last in both operands (q k^T contracts d, p v
# contracts s), the layout XLA:CPU's YNNPACK matmuls read: the per-layer decode cache is kept so,
# which spares a transpose of each layer's cache every decode step.
KV_LAYOUTS = {"slot_major": ("bskd", "bskd"), "head_major": ("bksd", "bkds")}


def attention(q, k, v, allowed, layout: str = "slot_major"):
    """Grouped-query softmax(q k^T / sqrt(D)) v without repeating k/v heads.

    q [B, T, N, D]; k, v [B, S, K, D] ("slot_major") or k [B, K, S, D], v [B, K, D, S]
    ("head_major"); allowed [B, T, S] bool. Scores and softmax in fp32.
    """
    B, T, N, D = q.shape
    k_spec, v_spec = KV_LAYOUTS[layout]
    K = k.shape[k_spec.index("k")]
    q = q.reshape(B, T, K, N // K, D)
    if layout == "head_major" and T == 1 and jax.default_backend() == "cpu":
        # A decode step on XLA:CPU: multiply-and-sum, where its batched matmuls run these tiny
        # [G, D] x [D, S] products far below their rate (1.2x faster decode on bench-small).
        f32 = jnp.float32
        scores = jnp.sum(q[:, 0, :, :, None, :].astype(f32) * k[:, :, None].astype(f32), axis=-1)[:, :, :, None]
        mix = lambda probs, v: jnp.sum(probs[:, :, :, 0, None, :].astype(f32) * v[:, :, None].astype(f32),
                                       axis=-1)[:, None]
    else:
        scores = jnp.einsum(f"btkgd,{k_spec}->bkgts", q, k, preferred_element_type=jnp.float32)
        mix = lambda probs, v: jnp.einsum(f"bkgts,{v_spec}->btkgd", probs, v, preferred_element_type=jnp.float32)
    scores = scores * (D ** -0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return mix(probs, v).reshape(B, T, N, D).astype(q.dtype)


def attention_mask_and_positions(key_mask, num_queries, offset):
    """``allowed[b, t, s] = s <= offset + t and key_mask[b, s]``; positions = cumsum(mask) - 1."""
    key_mask = key_mask.astype(jnp.bool_)
    q_slots = offset + jnp.arange(num_queries)
    k_slots = jnp.arange(key_mask.shape[1])
    allowed = (k_slots[None, :] <= q_slots[:, None])[None] & key_mask[:, None, :]
    positions_all = jnp.cumsum(key_mask, axis=1) - 1
    positions = jax.lax.dynamic_slice_in_dim(positions_all, offset, num_queries, axis=1)
    return allowed, jnp.maximum(positions, 0)


def init_cache(cfg: LlamaConfig, batch_size: int, max_len: int, dtype=None, per_layer: bool = False):
    """Empty KV cache: k, v [L, B, S, kv_heads, D] (kv heads only, never repeated); with
    ``per_layer`` a tuple of L caches in the head-major layout, k [B, kv_heads, S, D] and
    v [B, kv_heads, D, S], for ``unstack_layers`` weights."""
    dtype = dtype or cfg.compute_dtype
    B, S, K, D = batch_size, max_len, cfg.num_kv_heads, cfg.head_dim
    if per_layer:
        shapes = {"k": (B, K, S, D), "v": (B, K, D, S)}
        return tuple({name: with_logical_constraint(jnp.zeros(shape, dtype), LAYER_CACHE_AXES[name])
                      for name, shape in shapes.items()} for _ in range(cfg.num_layers))
    return {name: with_logical_constraint(jnp.zeros((cfg.num_layers, B, S, K, D), dtype), CACHE_AXES)
            for name in ("k", "v")}


def _update_cache(cache, k, v, cache_index, layer):
    """Write this layer's new k, v [B, T, K, D] at slot ``cache_index``; return the cache, the
    layer's k, v over all slots and their ``attention`` layout. ``cache``: the stacked cache
    [L, B, S, K, D], written in place at ``layer`` (a decode step never copies it), or one layer's
    own head-major cache (``layer`` None)."""
    if layer is None:
        k_new, v_new = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)  # [B, K, T, D], [B, K, D, T]
        cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k_new.astype(cache["k"].dtype), (0, 0, cache_index, 0)),
                 "v": jax.lax.dynamic_update_slice(cache["v"], v_new.astype(cache["v"].dtype), (0, 0, 0, cache_index))}
        return cache, cache["k"], cache["v"], "head_major"
    start = (layer, 0, cache_index, 0, 0)
    cache = {name: jax.lax.dynamic_update_slice(cache[name], new[None].astype(cache[name].dtype), start)
             for name, new in (("k", k), ("v", v))}
    k, v = (jax.lax.dynamic_index_in_dim(cache[name], layer, 0, keepdims=False) for name in "kv")
    return cache, k, v, "slot_major"


def _first_slots(x, spec: str, count: int):
    """The first ``count`` cache slots of ``x`` (its axes named by ``spec``; "s": slots): the keys
    a key mask shorter than the cache covers (a prefill reads the prompt block only)."""
    axis = spec.index("s")
    return x if x.shape[axis] == count else jax.lax.slice_in_dim(x, 0, count, axis=axis)


def _decoder_layer(cfg: LlamaConfig, w, x, cos, sin, allowed, cache, cache_index, layer):
    """One pre-norm block: x + Attn(RMSNorm(x)); then x + SwiGLU(RMSNorm(x)).

    ``cache``: None, the stacked cache with this ``layer``'s index, or this layer's own cache
    with ``layer`` None (see ``_update_cache``).
    """
    dt = cfg.compute_dtype
    h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    q, k, v = _project_qkv(w, h, dt)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    layout = "slot_major"
    if cache is not None:
        cache, k, v, layout = _update_cache(cache, k, v, cache_index, layer)
        k, v = (_first_slots(x, spec, allowed.shape[-1]).astype(dt) for x, spec in zip((k, v), KV_LAYOUTS[layout]))
    attn = attention(q, k, v, allowed, layout)
    x = x + dense(attn.reshape(*attn.shape[:2], -1), w["wo"].astype(dt).reshape(-1, x.shape[-1]))
    h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    return x + _mlp(w, h, dt), cache


def _project_qkv(w, h, dt):
    """q [B, T, N, D], k, v [B, T, K, D] from h [B, T, H]: three matmuls, or one with the fused
    ``wqkv`` of ``unstack_layers`` (per kv head: its G query heads, its key, its value)."""
    if "wqkv" in w:
        hidden, kv_heads, width, head_dim = w["wqkv"].shape
        qkv = dense(h, w["wqkv"].astype(dt).reshape(hidden, -1)).reshape(*h.shape[:2], kv_heads, width, head_dim)
        return qkv[..., :-2, :].reshape(*h.shape[:2], -1, head_dim), qkv[..., -2, :], qkv[..., -1, :]

    def project(name):  # [B, T, H] x [H, heads, D] -> [B, T, heads, D]
        kernel = w[name].astype(dt)
        return dense(h, kernel.reshape(kernel.shape[0], -1)).reshape(*h.shape[:2], *kernel.shape[1:])

    return project("wq"), project("wk"), project("wv")


def _mlp(w, h, dt):
    """SwiGLU of h [B, T, H]: ``swiglu_mlp``, or with the fused ``w_gate_up`` [H, I, 2] of
    ``unstack_layers`` one matmul for g and u."""
    if "w_gate_up" in w:
        hidden, inner, _ = w["w_gate_up"].shape
        gate_up = dense(h, w["w_gate_up"].astype(dt).reshape(hidden, -1)).reshape(*h.shape[:2], inner, 2)
        return dense(jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1], w["w_down"].astype(dt))
    return swiglu_mlp(h, w["w_gate"].astype(dt), w["w_up"].astype(dt), w["w_down"].astype(dt))


def _remat(cfg: LlamaConfig, fn):
    """``cfg.remat``: none; full (keep the layer's inputs only); dots (keep every matmul output
    without batch dims too: the custom-VJP projections hide theirs from the dots policy, so they
    name them ``PROJECTION``)."""
    if cfg.remat == "full":
        return jax.checkpoint(fn, static_argnums=(0,))
    if cfg.remat == "dots":
        policy = jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
            jax.checkpoint_policies.save_only_these_names(PROJECTION))
        return jax.checkpoint(fn, policy=policy, static_argnums=(0,))
    return fn


def stacked_weights(layers: DecoderLayers) -> dict[str, jax.Array]:
    """The layer parameters as arrays stacked on a leading layers axis: name -> [L, ...]."""
    return {name: var[...] for name, var in vars(layers).items() if isinstance(var, nnx.Param)}


def unstack_layers(layers: DecoderLayers, dtype) -> tuple[dict[str, jax.Array], ...]:
    """A per-layer copy of the layer weights in ``dtype`` for decoding: L dicts name -> array,
    with the gate and up kernels fused into ``w_gate_up`` [H, I, 2] and the q, k, v kernels into
    ``wqkv`` [H, K, G + 2, D] (per kv head: its G = N / K query heads, its key, its value).

    A loop over separate arrays reads each weight once per step, where the stacked parameters
    cost a slice (on GPU, XLA copies the MLP kernels out of the stack every step) and a cast per
    step when the parameters are kept in fp32. One matmul replaces three (q, k, v) and one two
    (gate, up): XLA:CPU runs these small batch-row matmuls far below its rate (greedy generation
    on bench-small ~1.07x faster). The fused kernels are split on their kv-head and MLP axes, as
    tensor parallelism splits the parameters; q, k, v stay separate where the active rules split
    heads and kv heads differently (e.g. kv heads replicated when fewer than the tensor axis).
    Costs one copy of the weights."""
    stacked = stacked_weights(layers)
    num_layers = next(iter(stacked.values())).shape[0]
    fuse_qkv = shards_alike("heads", "kv_heads")

    def layer(i):
        w = {name: x[i].astype(dtype) for name, x in stacked.items()}
        w["w_gate_up"] = with_logical_constraint(jnp.stack([w.pop("w_gate"), w.pop("w_up")], axis=-1),
                                                 ("embed", "mlp", None))
        if fuse_qkv:
            wq, wk, wv = w.pop("wq"), w.pop("wk"), w.pop("wv")
            hidden, kv_heads, head_dim = wk.shape
            wq = wq.reshape(hidden, kv_heads, -1, head_dim)
            w["wqkv"] = with_logical_constraint(jnp.concatenate([wq, wk[:, :, None], wv[:, :, None]], axis=2),
                                                ("embed", "kv_heads", None, "head_dim"))
        return w

    return tuple(layer(i) for i in range(num_layers))


def decoder_forward(cfg, embed, weights, final_norm, tokens, key_mask, cache, cache_index):
    """Embeddings -> L decoder layers (scanned or unrolled) -> final RMSNorm.

    tokens [B, T]; key_mask [B, S] over keys (S = T without cache; with one, its first S >= cache_index + T slots);
    cache_index: the cache slot of tokens[:, 0]. ``weights``: ``stacked_weights`` (name ->
    [L, ...]; scanned unless ``cfg.scan_layers`` is off; a stacked cache) or ``unstack_layers``'
    per-layer tuple (an unrolled loop; a per-layer cache, ``init_cache(..., per_layer=True)``).
    """
    if cache is None and key_mask.shape[1] != tokens.shape[1]:
        raise ValueError(f"key_mask {key_mask.shape} must match tokens {tokens.shape} without a cache")
    offset = 0 if cache is None else cache_index
    if isinstance(offset, int) and key_mask.shape[1] < offset + tokens.shape[1]:
        raise ValueError(f"key_mask {key_mask.shape} must cover cache slots up to {offset} + {tokens.shape[1]}")
    allowed, positions = attention_mask_and_positions(key_mask, tokens.shape[1], offset)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    # FSDP-style: the table is gathered over its embed shards before the lookup (the rows stay split
    # by vocab), so the looked-up rows come out split by batch like every activation, not by embed.
    table = with_logical_constraint(embed, ("vocab", None))
    x = with_logical_constraint(jnp.take(table, tokens, axis=0).astype(cfg.compute_dtype), RESIDUAL_AXES)
    layer_fn = _remat(cfg, _decoder_layer)

    def body(carry, per_layer):
        x, cache = carry
        w, layer = per_layer
        x, cache = layer_fn(cfg, w, x, cos, sin, allowed, cache, cache_index, layer)
        return (with_logical_constraint(x, RESIDUAL_AXES), cache), None

    if isinstance(weights, tuple):
        caches = [None] * len(weights) if cache is None else list(cache)
        for layer, layer_weights in enumerate(weights):
            (x, caches[layer]), _ = body((x, caches[layer]), (layer_weights, None))
        cache = None if cache is None else tuple(caches)
    elif cfg.scan_layers:
        (x, cache), _ = jax.lax.scan(body, (x, cache), (weights, jnp.arange(cfg.num_layers)))
    else:
        for layer in range(cfg.num_layers):
            layer_weights = {name: w[layer] for name, w in weights.items()}
            (x, cache), _ = body((x, cache), (layer_weights, layer))
    return rms_norm(x, final_norm, cfg.rms_norm_eps), cache
