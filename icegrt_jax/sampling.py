"""Batched generation with a KV cache: one jitted prefill, then an on-device ``lax.while_loop``.

``generate(model_or_params, prompts, SamplingParams(...)) -> GenerationResult`` (unpacks as
``tokens, logprobs, mask``)

Layout of one batch (all shapes bucketed, see below)::

    cache slots:  [ left-padded prompt (P slots) | new tokens (N slots) ]
    prefill:      the prompt block in one call, written into the first P slots of the cache
                  (its attention reads those P slots only); only the last position is projected
                  to logits
    decode:       lax.while_loop; step i samples token i from the previous logits, writes it,
                  runs the model on it at slot P + i; stops when every row has stopped or
                  max_new_tokens is reached

A row stops at its first EOS (the EOS is kept, padding follows), at ``max_new_tokens``, or when
prompt + response would exceed the model's context (``max_position_embeddings``).

Bucketing (bounded compilation). Programs are compiled per shape, so shapes come from buckets:

- prompt width P: the smallest of ``PROMPT_BUCKETS`` (powers of two from 16) >= the longest
  prompt of the batch;
- new-token slots N: the smallest of ``NEW_TOKEN_BUCKETS`` (powers of two from 16) >=
  ``max_new_tokens`` (the exact limit is a runtime value, so 40 and 64 share one program), or
  >= the room the context leaves after the shortest prompt when that is smaller;
- cache size = P + N;
- prompts per batch: the smallest power of two >= the batch's prompt count, or ``batch_size``
  when that is smaller (a given ``batch_size`` bounds the rows and the KV cache); the extra rows
  are dummies that start finished and are dropped.

Prefill compiles once per (batch bucket, P, N, num_samples); decode once per (batch bucket, P,
N, num_samples, the static sampling options: greedy, top_k, whether top-p filters). Temperature,
top_p's value, max_new_tokens, the EOS ids (padded to a multiple of 4) and the seed are runtime
values. ``TRACE_COUNTS`` counts the traces of each jitted function (tests use it to check the
bound).

Weights and cache layout. Each ``generate`` call first copies the layer weights into per-layer
arrays in the compute dtype, with q/k/v and gate/up fused into one kernel each
(``unstack_layers``), plus the LM head kernel (``_inference_weights``, one copy of the weights in
memory while it runs), and the cache is per layer (``init_cache(per_layer=True)``): a decode step
then reads every weight once, slices nothing and runs four projection matmuls a layer. From the
stacked parameters, XLA:GPU copied each layer's MLP kernels out of the stack every step
(BENCHMARKS.md, "On a GPU"). On CPU the decode loop compiles without XLA's YNNPACK fusions and
tree reduction rewriter (``_CPU_DECODE_OPTIONS``; its fp32 sums then run in one pass, in order).

``num_samples`` samples per prompt share one prefill: the prompt's keys and values are repeated
``num_samples`` times along the batch axis on device, into the cache the decode loop updates in
place (donated to it: one KV cache in memory while decoding, never two).

Sampling and log-probs. With ``z`` the fp32 logits of a step and ``T`` the temperature:

- greedy (``greedy=True`` or ``T == 0``): the token is ``argmax z`` (first index on ties) and its
  log-prob is ``log_softmax(z)[token]`` (T does not enter);
- otherwise ``s = z / T``; top-k keeps the ``k`` largest ``s`` (ties with the k-th are kept);
  top-p then keeps the smallest prefix of tokens sorted by descending probability whose mass
  reaches ``top_p`` (a token is kept iff the mass of the tokens strictly before it is < top_p;
  ties with the last kept value are kept); removed tokens get ``-inf``, giving ``f``. The token is
  drawn from ``softmax(f)`` by inverting its CDF at two uniform numbers per row and step, one
  for a block of tokens, one inside it (``inverse_cdf_sample``: not one random number per
  vocabulary entry as Gumbel-max needs, which on CPU cost more than the model's decode step) and
  its log-prob is ``log_softmax(f)[token]``: the log-prob under the
  distribution it was sampled from, renormalised over the kept tokens. With ``top_k=0`` and
  ``top_p=1`` this is exactly ``log_softmax(z / T)[token]``, which PPO recomputes from a full
  forward by dividing the logits by the same temperature.

RNG and determinism. Row (prompt ``i`` of the caller's list, sample ``j``) draws step ``t`` with
``fold_in(fold_in(fold_in(PRNGKey(seed), i), j), t)``, so a row's randomness depends only on
(seed, i, j, t), not on the batch it shares or the order of processing. Results are therefore
bitwise reproducible for a given seed and inputs, and a prompt's samples do not depend on the
other prompts in its batch as long as the batch has the same bucketed shape (rows never read
each other). When the batch bucket, prompt bucket or new-token bucket differs (or the mesh),
floating-point reduction order inside XLA's kernels may differ in the last bits, which moves the
CDF's boundaries by as much: a draw that lands within that distance of a boundary takes the
neighbouring token (and a greedy near-tie may flip). Each flip is about as likely as the summed
mass of the very light tokens near the draw, so without top-k/top-p long responses over a large
vocabulary can diverge between bucketings; equal samples are promised only for equal bucketed
shapes. A caller that needs fresh samples for the same prompt list (each PPO iteration) passes a
new seed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from icegrt_jax.config import MIN_TEMPERATURE
from icegrt_jax.errors import UserInputError
from icegrt_jax.models.llama import (
    LAYER_CACHE_AXES,
    LlamaConfig,
    init_cache,
    unstack_layers,
)
from icegrt_jax.sharding import with_logical_constraint

PROMPT_BUCKETS: tuple[int, ...] = tuple(2 ** i for i in range(4, 18))  # 16 ... 131072
NEW_TOKEN_BUCKETS: tuple[int, ...] = PROMPT_BUCKETS
TRACE_COUNTS: Counter = Counter()  # jitted function name -> number of traces (= compilations)


class SamplingError(UserInputError):
    """Invalid sampling options or prompts."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. Hashable; validated on construction.

    temperature: divides the logits; 0 means greedy. top_k: keep the k most likely tokens
    (0: off). top_p: nucleus mass in (0, 1] (1: off). greedy: argmax regardless of the rest.
    max_new_tokens: response length limit (EOS included). eos_token_ids: tokens that end a row;
    None means the model config's (``LlamaConfig.eos_token_ids``), () means never stop early.
    num_samples: responses per prompt (the paper ranks 5). seed: see the module docstring.
    pad_id: written after a row stops and into prompt padding; None means the model's
    ``pad_token_id`` (0 when it has none). The mask, never the pad id, says what is real.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    max_new_tokens: int = 128
    eos_token_ids: tuple[int, ...] | None = None
    num_samples: int = 1
    seed: int = 0
    pad_id: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_ids, (list, int)):
            ids = [self.eos_token_ids] if isinstance(self.eos_token_ids, int) else self.eos_token_ids
            object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in ids))
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf):
            raise SamplingError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                                f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise SamplingError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise SamplingError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise SamplingError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def static_options(self) -> StaticOptions:
        """The options compiled into the decode program (the rest are runtime values)."""
        return StaticOptions(self.is_greedy, self.top_k, self.top_p < 1.0)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Unpacks as the stable API's ``tokens, logprobs, mask = generate(...)``; every field is an
    attribute. Rows are prompt-major: row ``r`` is sample ``r % num_samples`` of prompt ``r // num_samples``.

    With P the prompt bucket of the longest prompt and N = max_new_tokens (or, when smaller, the
    room the model's context leaves after the shortest prompt), every [R, P + N] array holds the
    left-padded prompt in columns [0, P) and the response from column P.

    tokens [R, P+N] int32: prompt + response, ``pad_id`` elsewhere.
    logprobs [R, P+N] float32: log-prob of each response token under the distribution it was
      sampled from (module docstring); 0 outside ``mask``.
    mask [R, P+N] int32: 1 on response tokens, the EOS included; 0 on prompt and padding.
    attention_mask [R, P+N] int32: 1 on real prompt tokens and on response tokens.
    lengths [R] int32: response lengths (EOS included).
    finished_by_eos [R] bool: True if the row ended with EOS, False if truncated (by
      max_new_tokens or the model's context).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    mask: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray
    finished_by_eos: np.ndarray

    def __iter__(self):
        return iter((self.tokens, self.logprobs, self.mask))

    def response_tokens(self, row: int) -> np.ndarray:
        """The response of ``row`` (EOS included), without padding."""
        return self.tokens[row][self.mask[row].astype(bool)]


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n."""
    for size in buckets:
        if size >= n:
            return size
    raise SamplingError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def batch_bucket(n: int) -> int:
    """Batch rows are padded to a power of two."""
    return 1 << max(0, (n - 1).bit_length())


# --- per-step sampling (pure) ------------------------------------------------------------------

class StaticOptions(NamedTuple):
    """The sampling options that change the compiled program."""

    greedy: bool
    top_k: int
    filter_top_p: bool


def filter_logits(scaled, top_k: int, top_p=None):
    """Top-k then top-p filtering of ``scaled`` [R, V] (removed entries -> -inf); see module doc.

    ``top_k`` is static (0: off); ``top_p`` is a traced scalar or None (off).
    """
    neg_inf = jnp.array(-jnp.inf, scaled.dtype)
    ranked = None
    if top_k and top_k < scaled.shape[-1]:
        ranked = jax.lax.top_k(scaled, top_k)[0]  # descending
        scaled = jnp.where(scaled < ranked[:, -1:], neg_inf, scaled)
    if top_p is not None:
        if ranked is None:
            ranked = -jnp.sort(-scaled, axis=-1)
        # Normalised over every kept token: with ties at the k-th value more than k are kept.
        probs = jnp.exp(ranked - jax.nn.logsumexp(scaled, axis=-1, keepdims=True))
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: mass_before[0] = 0
        threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
        scaled = jnp.where(scaled < threshold, neg_inf, scaled)
    return scaled


def sample_step(logits, keys, static: StaticOptions, temperature, top_p):
    """One token per row from fp32 ``logits`` [R, V] -> (tokens [R] int32, logprobs [R] f32)."""
    if static.greedy:  # argmax as plain reductions (XLA:CPU's argmax is slow): first index on ties,
        top = jnp.max(logits, axis=-1, keepdims=True)  # the first NaN if any (as argmax: a valid id)
        vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        hit = (logits == top) | jnp.isnan(logits)
        tokens = jnp.min(jnp.where(hit, vocab, logits.shape[-1]), axis=-1)
        # z[token] - logsumexp(z); the sum as a product with ones (in full fp32: no TF32 / bf16
        # passes on accelerators): XLA:CPU fused the exp into a row reduction's scalar loop
        # (greedy generation on bench-small ~10% slower)
        ones = jnp.ones(logits.shape[-1], logits.dtype)
        return tokens, -jnp.log(jnp.dot(jnp.exp(logits - top), ones, precision=jax.lax.Precision.HIGHEST))
    scaled = filter_logits(logits / temperature, static.top_k, top_p if static.filter_top_p else None)
    top = jnp.max(scaled, axis=-1, keepdims=True)
    weights = jnp.exp(scaled - top)  # 0 for the filtered tokens
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, (2,), dtype=jnp.float32))(keys)
    tokens = inverse_cdf_sample(weights, uniforms)
    chosen = jnp.take_along_axis(scaled - top, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - jnp.log(jnp.sum(weights, axis=-1))  # f[token] - logsumexp(f)


def inverse_cdf_sample(weights, uniforms, block: int = 128):
    """Index i drawn with probability w_i / sum(w) from weights [R, V] >= 0, given uniforms [R, 2]
    in [0, 1): the block of ``block`` entries is the first whose running block total exceeds
    u_0 x sum(w), the entry the first in it whose running total exceeds u_1 x (the block's mass):
    P(i) = P(block) P(i | block) = w_i / sum(w), each factor resolved to float32's 2^-23 of its
    own total, and no cumulative sum runs over the whole vocabulary. An entry of weight 0 (a
    filtered token, block padding) is never chosen: where float rounding puts a target outside
    the positive-weight range, the first or last entry of positive weight is taken.
    """
    rows, vocab = weights.shape
    size = min(block, vocab)
    blocks = -(-vocab // size)
    grid = jnp.pad(weights, ((0, 0), (0, blocks * size - vocab))).reshape(rows, blocks, size)
    block_mass = jnp.sum(grid, axis=-1)
    block_cum = jnp.cumsum(block_mass, axis=-1)
    chosen = _first_above(block_cum, block_mass, uniforms[:, 0] * block_cum[:, -1])
    inside = jnp.take_along_axis(grid, chosen[:, None, None], axis=1)[:, 0]
    inside_cum = jnp.cumsum(inside, axis=-1)
    entry = _first_above(inside_cum, inside, uniforms[:, 1] * inside_cum[:, -1])
    return (chosen * size + entry).astype(jnp.int32)


def _first_above(cum, mass, target):
    """Per row, the first index of positive mass with cum > target; the last index of positive
    mass where rounding leaves none above the target."""
    index = jnp.arange(cum.shape[-1])
    positive = mass > 0
    above = jnp.min(jnp.where(positive & (cum > target[:, None]), index, cum.shape[-1]), axis=-1)
    return jnp.minimum(above, jnp.max(jnp.where(positive, index, 0), axis=-1))


def row_keys(seed, prompt_index, num_samples: int):
    """Keys [R] for prompt-major rows: fold_in(fold_in(PRNGKey(seed), prompt), sample)."""
    base = jax.random.PRNGKey(seed)
    samples = jnp.arange(num_samples)

    def for_prompt(i):
        prompt_key = jax.random.fold_in(base, i)
        return jax.vmap(lambda j: jax.random.fold_in(prompt_key, j))(samples)

    keys = jax.vmap(for_prompt)(prompt_index)
    return keys.reshape(-1, *keys.shape[2:])


# --- jitted programs ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _inference_weights(graphdef, params):
    """The weights generation reads every step, copied once per ``generate`` call in the compute
    dtype: the per-layer weights (``unstack_layers``) and the LM head kernel [H, V]."""
    model = nnx.merge(graphdef, params)
    dtype = model.cfg.compute_dtype
    return {"layers": unstack_layers(model.layers, dtype), "lm_head": model.lm_head_kernel().astype(dtype)}


def _logits(model, weights, tokens, key_mask, cache, cache_index):
    """fp32 logits [B, V] of the last of ``tokens`` and the updated cache."""
    hidden, cache = model.hidden_states(tokens, key_mask, cache, cache_index, weights["layers"])
    return jnp.einsum("bh,hv->bv", hidden[:, -1], weights["lm_head"], preferred_element_type=jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "new_slots", "num_samples"))
def _prefill(graphdef, params, weights, tokens, prompt_mask, *, new_slots, num_samples):
    """Run the prompts [B, P] once; return the logits [R, V] at the last prompt slot and a cache
    of R = B x ``num_samples`` rows (prompt-major) and P + N slots with each prompt's keys and
    values in its first P slots (attention reads the prompt block only: the key mask covers P
    slots). With one sample the prompts are written straight into the full cache; with more,
    into a P-slot cache whose rows are repeated into the full one (never two full caches)."""
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, params)
    batch, width = tokens.shape
    if num_samples == 1:
        return _logits(model, weights, tokens, prompt_mask, init_cache(model.cfg, batch, width + new_slots, per_layer=True), 0)
    logits, prompt_cache = _logits(model, weights, tokens, prompt_mask, init_cache(model.cfg, batch, width, per_layer=True), 0)
    slot_axis = {"k": 2, "v": 3}  # init_cache(per_layer=True): k [B, K, S, D], v [B, K, D, S]

    def repeated(name, c):
        padding = [(0, 0)] * c.ndim
        padding[slot_axis[name]] = (0, new_slots)
        return with_logical_constraint(jnp.pad(jnp.repeat(c, num_samples, axis=0), padding), LAYER_CACHE_AXES[name])

    cache = tuple({name: repeated(name, c) for name, c in layer.items()} for layer in prompt_cache)
    return jnp.repeat(logits, num_samples, axis=0), cache


def _decode(graphdef, params, weights, cache, logits, prompt_mask, prompt_index, row_limit, seed,
            temperature, top_p, pad_id, eos, *, static: StaticOptions, num_samples: int):
    """The decode loop. Per row (R = B x num_samples, ``_prefill``'s): cache, logits [R, V]; per
    prompt: prompt_mask [B, P], prompt_index [B], row_limit [B] (0 for a dummy row); eos [E] (-1
    entries match nothing). Returns response tokens, logprobs, mask [R, N], finished_by_eos [R]
    and the final cache: returned so that the donated input cache is the loop's own buffer
    (written in place, where a cache that is not donated is copied before the loop).

    The key mask's response part doubles as the response mask: slot P + t is marked real when
    token t is written by a row that had not stopped before it."""
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, params)
    width = prompt_mask.shape[1]
    new_slots = cache[0]["k"].shape[2] - width
    if num_samples > 1:
        prompt_mask = jnp.repeat(prompt_mask, num_samples, axis=0)
        row_limit = jnp.repeat(row_limit, num_samples, axis=0)
    rows = logits.shape[0]
    keys = row_keys(seed, prompt_index, num_samples)
    key_mask = jnp.pad(prompt_mask.astype(jnp.int32), ((0, 0), (0, new_slots)))

    def sample_into(state, logits):
        step, cache, key_mask, out_tok, out_lp, done, by_eos = state
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        token, logp = sample_step(logits, step_keys, static, temperature, top_p)
        token = jnp.where(done, pad_id, token)
        logp = jnp.where(done, 0.0, logp)
        hit_eos = ~done & jnp.isin(token, eos)
        out_tok = jax.lax.dynamic_update_slice_in_dim(out_tok, token[:, None], step, 1)
        out_lp = jax.lax.dynamic_update_slice_in_dim(out_lp, logp[:, None], step, 1)
        key_mask = jax.lax.dynamic_update_slice_in_dim(key_mask, (~done).astype(jnp.int32)[:, None],
                                                        width + step, 1)
        done = done | hit_eos | (step + 1 >= row_limit)
        return (step + 1, cache, key_mask, out_tok, out_lp, done, by_eos | hit_eos)

    def cond(state):
        step, *_, done, _ = state
        return (step < new_slots) & ~jnp.all(done)

    def body(state):
        step, cache, key_mask, out_tok = state[:4]
        last = jax.lax.dynamic_slice_in_dim(out_tok, step - 1, 1, axis=1)
        step_logits, cache = _logits(model, weights, last, key_mask, cache, width + step - 1)
        return sample_into((step, cache) + state[2:], step_logits)

    state = (jnp.int32(0), cache, key_mask,
             jnp.full((rows, new_slots), pad_id, jnp.int32), jnp.zeros((rows, new_slots), jnp.float32),
             row_limit <= 0, jnp.zeros((rows,), bool))
    state = sample_into(state, logits)
    _, cache, key_mask, out_tok, out_lp, _, by_eos = jax.lax.while_loop(cond, body, state)
    return out_tok, out_lp, key_mask[:, width:], by_eos, cache


_DECODE_STATIC = ("graphdef", "static", "num_samples")
_DECODE_DONATED = ("cache",)
# A decode step is ~80 small ops (batch-row matmuls, norms, one query's attention). XLA:CPU's
# YNNPACK fusions cost a fixed ~0.1 ms each, which dominates at these sizes, so on CPU the decode
# loop compiles without them (its own dot and loop emitters): 1.3x faster decode on bench-small.
# The training steps' larger matmuls run faster with YNNPACK and keep it. XLA's tree reduction
# rewriter splits every reduction longer than 32 (norms over H, attention over the cache slots)
# into a reduce-window and a second reduce, each ~50 us at these sizes: without it a fp32 sum runs
# in one pass (1.15x faster decode). On AVX-512 CPUs, 512-bit vectors in XLA's own loops: ~3% faster
# decode on an Intel Xeon with AVX-512 (LLVM's default there is 256; CPUs without AVX-512 ignore it).
_CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_disable_hlo_passes": "tree_reduction_rewriter",
                       "xla_cpu_prefer_vector_width": 512}


@functools.cache
def _decode_program():
    """The jitted decode loop for the default backend: on CPU with those of
    ``_CPU_DECODE_OPTIONS`` this XLA accepts (each is experimental: a later jax may drop one)."""
    options = {}
    if jax.default_backend() == "cpu":
        options = {name: value for name, value in _CPU_DECODE_OPTIONS.items() if _accepted({name: value})}
    return jax.jit(_decode, static_argnames=_DECODE_STATIC, donate_argnames=_DECODE_DONATED,
                   compiler_options=options or None)


def _accepted(options: dict) -> bool:
    """Whether XLA compiles a trivial program with ``options``."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - any refusal means: compile without it
        return False
    return True


# --- host side ---------------------------------------------------------------------------------

def split_model(model_or_params):
    """(graphdef, params, cfg) of an nnx ``Llama`` or a ``(graphdef, params)`` pair."""
    if isinstance(model_or_params, tuple) and len(model_or_params) == 2:
        graphdef, params = model_or_params
        cfg = nnx.merge(graphdef, params).cfg
    elif isinstance(model_or_params, nnx.Module):
        graphdef, params = nnx.split(model_or_params)
        cfg = model_or_params.cfg
    else:
        raise TypeError(f"expected an nnx Llama or a (graphdef, params) pair, got {type(model_or_params).__name__}")
    if not isinstance(cfg, LlamaConfig):
        raise TypeError("the model has no LlamaConfig `cfg`")
    return graphdef, params, cfg


def check_prompts(prompts, cfg: LlamaConfig, labels: Sequence[str] | None = None) -> list[np.ndarray]:
    """The prompts as int32 arrays; ``SamplingError`` for an empty list, an empty prompt, one
    that leaves no room in the context, or ids outside the vocabulary. ``labels[i]`` names prompt
    i in the errors (default "prompt i"; e.g. the file and line it came from)."""
    if prompts is None or len(prompts) == 0:
        raise SamplingError("no prompts given (the prompt list is empty)")
    checked = []
    for i, prompt in enumerate(prompts):
        label = f"prompt {i}" if labels is None else labels[i]
        ids = np.asarray(prompt)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise SamplingError(f"{label}: expected a 1-D sequence of token ids, got shape {ids.shape} "
                                f"of {ids.dtype}")
        if ids.size == 0:
            raise SamplingError(f"{label} is empty (it needs at least one token, e.g. BOS)")
        if ids.size >= cfg.max_position_embeddings:
            raise SamplingError(f"{label} has {ids.size} tokens; the model's context is "
                                f"{cfg.max_position_embeddings}, which leaves no room for a response")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise SamplingError(f"{label} has token ids outside [0, {cfg.vocab_size})")
        checked.append(ids.astype(np.int32))
    return checked


def generate(model_or_params, prompts: Sequence[Sequence[int]], params: SamplingParams,
             *, batch_size: int | None = None, progress: bool = False,
             on_batch: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate ``params.num_samples`` responses for each prompt (lists/arrays of token ids).

    ``batch_size`` prompts run per batch (default: all at once); with several batches the prompts
    are processed shortest first so each batch pads less, and the result is in the caller's order.
    ``progress`` shows a bar; ``on_batch(n)`` is called as each batch of n prompts finishes.
    See the module docstring for shapes, bucketing, log-probs and RNG semantics.
    """
    graphdef, state, cfg = split_model(model_or_params)
    prompts = check_prompts(prompts, cfg)
    if batch_size is not None and batch_size < 1:
        raise SamplingError(f"batch_size must be positive, got {batch_size}")
    rows_cap = batch_size or float("inf")  # without a batch_size, batches are padded to a power of two
    batch_size = batch_size or len(prompts)
    default_pad = cfg.pad_token_id if cfg.pad_token_id is not None and cfg.pad_token_id >= 0 else 0  # LLaMA-1: -1
    pad_id = params.pad_id if params.pad_id is not None else default_pad
    if not 0 <= pad_id < cfg.vocab_size:  # padding is fed to the model (masked): its row must exist
        raise SamplingError(f"pad_id {pad_id} is outside the model's vocabulary [0, {cfg.vocab_size})")
    eos_ids = cfg.eos_token_ids if params.eos_token_ids is None else params.eos_token_ids
    static = params.static_options()
    eos = np.full((-(-max(len(eos_ids), 1) // 4) * 4,), -1, np.int32)
    eos[:len(eos_ids)] = eos_ids
    n, new = params.num_samples, params.max_new_tokens
    room = cfg.max_position_embeddings - min(len(p) for p in prompts)
    new_slots = bucket(min(new, room), NEW_TOKEN_BUCKETS)
    cols = min(new, room)  # response columns some row can fill
    width = bucket(max(len(p) for p in prompts), PROMPT_BUCKETS)

    rows = len(prompts) * n
    tokens = np.full((rows, width + cols), pad_id, np.int32)
    logprobs = np.zeros((rows, width + cols), np.float32)
    prompt_mask = np.zeros((rows, width + cols), np.int32)
    by_eos = np.zeros((rows,), bool)
    mask = np.zeros((rows, width + cols), np.int32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if batch_size < len(prompts) \
        else list(range(len(prompts)))
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    weights = _inference_weights(graphdef, state)
    bar = _progress_bar(len(prompts), progress)
    for chunk in chunks:
        out_tok, out_lp, out_mask, eos_flags = _generate_batch(
            graphdef, state, weights, cfg, [prompts[i] for i in chunk], np.asarray(chunk, np.int32),
            static, params, new_slots, pad_id, eos, rows_cap)
        for c, i in enumerate(chunk):
            p = prompts[i]
            dst = slice(i * n, (i + 1) * n)
            tokens[dst, width - len(p):width] = p
            prompt_mask[dst, width - len(p):width] = 1
            tokens[dst, width:] = out_tok[c * n:(c + 1) * n, :cols]
            logprobs[dst, width:] = out_lp[c * n:(c + 1) * n, :cols]
            mask[dst, width:] = out_mask[c * n:(c + 1) * n, :cols]
            by_eos[dst] = eos_flags[c * n:(c + 1) * n]
        bar.update(len(chunk))
        if on_batch is not None:
            on_batch(len(chunk))
    bar.close()
    return GenerationResult(tokens, logprobs, mask, prompt_mask | mask, mask.sum(1).astype(np.int32), by_eos)


def _generate_batch(graphdef, state, weights, cfg, prompts, prompt_index, static, params, new_slots, pad_id, eos,
                    rows_cap):
    count = len(prompts)
    padded = min(batch_bucket(count), rows_cap)
    width = bucket(max(len(p) for p in prompts), PROMPT_BUCKETS)
    tokens = np.full((padded, width), pad_id, np.int32)
    mask = np.zeros((padded, width), np.int32)
    tokens[count:, -1] = pad_id  # dummy rows: one token, so no row attends to nothing
    mask[count:, -1] = 1
    limit = np.zeros((padded,), np.int32)
    index = np.zeros((padded,), np.int32)
    index[:count] = prompt_index
    for row, p in enumerate(prompts):
        tokens[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
        limit[row] = min(params.max_new_tokens, cfg.max_position_embeddings - len(p))
    logits, cache = _prefill(graphdef, state, weights, tokens, mask, new_slots=new_slots,
                             num_samples=params.num_samples)
    out_tok, out_lp, out_mask, by_eos, _ = _decode_program()(
        graphdef, state, weights, cache, logits, mask, index, limit, np.uint32(params.seed),
        np.float32(params.temperature or 1.0), np.float32(params.top_p), np.int32(pad_id), eos,
        static=static, num_samples=params.num_samples)
    rows = count * params.num_samples
    return tuple(to_host(x)[:rows] for x in (out_tok, out_lp, out_mask, by_eos))


def to_host(x: jax.Array) -> np.ndarray:
    """``x``'s global value as numpy on every process: in a multi-process run, the rows other
    processes hold are gathered first (every process takes part)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="prompt", desc="generate", leave=False)  # also under a trainer's bar
