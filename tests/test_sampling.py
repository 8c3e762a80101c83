"""The rollout sampler: parity with transformers' greedy generate, filtering, the sampling
distribution, log-prob definition, RNG semantics, bounded compilation and input errors."""

import dataclasses
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import make_hf_llama
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from icegrt_jax.errors import UserInputError
from icegrt_jax.hf import load_hf, model_from_params
from icegrt_jax.sampling import (
    PROMPT_BUCKETS,
    TRACE_COUNTS,
    SamplingError,
    SamplingParams,
    StaticOptions,
    _decode_program,
    _inference_weights,
    _prefill,
    batch_bucket,
    bucket,
    filter_logits,
    generate,
    inverse_cdf_sample,
    row_keys,
    sample_step,
)

# Tests share shapes and static sampling options where they can: each new combination is a
# compilation (seconds on a shared CPU).
LENGTHS = [5, 9, 3, 12, 7]  # all in the 16-token prompt bucket, batch bucket 8
NEW = 10  # in the 16-token new-token bucket
GREEDY = SamplingParams(greedy=True, max_new_tokens=NEW, eos_token_ids=())
SAMPLED = SamplingParams(temperature=0.8, top_k=4, top_p=0.9, max_new_tokens=NEW, eos_token_ids=(),
                         num_samples=3, seed=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, our Llama) with the same random weights (vocab 96, context 256, pad 0)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    torch_model = make_hf_llama(path)
    cfg, params = load_hf(str(path))
    return torch_model, model_from_params(cfg, params)


def random_prompts(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]


def left_pad(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def hf_greedy(torch_model, prompts, new, eos):
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = torch_model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                   do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=0,
                                   return_dict_in_generate=True, output_logits=True)
    response = out.sequences[:, ids.shape[1]:].numpy()
    logits = torch.stack(out.logits, 1).float().numpy()  # [B, steps, V]
    return response, logits


def full_forward_logits(model, result, rows=slice(None)):
    """Logits of every position of the generated sequences from one cache-free forward."""
    tokens, mask = result.tokens[rows], result.attention_mask[rows]
    logits, _ = jax.jit(lambda t, m: model(t, m))(jnp.asarray(tokens), jnp.asarray(mask))
    return np.asarray(logits)


def test_greedy_matches_transformers_token_for_token_with_eos(tiny):
    torch_model, model = tiny
    prompts = random_prompts(LENGTHS, model.cfg.vocab_size)
    free, _ = hf_greedy(torch_model, prompts, NEW, eos=None)
    # An EOS id that greedy decoding reaches in some rows but not in others.
    eos = next(int(t) for t in free[0, 1:] if not all(t in row for row in free))
    expected, hf_logits = hf_greedy(torch_model, prompts, NEW, eos=eos)

    result = generate(model, prompts, SamplingParams(greedy=True, max_new_tokens=NEW, eos_token_ids=(eos,)))
    width = result.tokens.shape[1] - NEW
    ours = result.tokens[:, width:]
    steps = expected.shape[1]  # transformers stops once every row has finished
    np.testing.assert_array_equal(ours[:, :steps], expected)  # transformers pads with 0 after EOS, as ours

    ended = (expected == eos).any(1)
    assert ended.any() and not ended.all()
    np.testing.assert_array_equal(result.finished_by_eos, ended)
    first_eos = np.where(ended, (expected == eos).argmax(1) + 1, NEW)
    np.testing.assert_array_equal(result.lengths, first_eos)
    np.testing.assert_array_equal(result.mask[:, width:], np.arange(NEW)[None] < first_eos[:, None])
    assert (result.mask[:, :width] == 0).all()
    for row, p in enumerate(prompts):  # the prompt is left-padded into the first `width` columns
        np.testing.assert_array_equal(result.tokens[row, width - len(p):width], p)
        np.testing.assert_array_equal(result.attention_mask[row, :width], np.arange(width) >= width - len(p))

    # Greedy log-prob: log_softmax(logits)[argmax], against transformers' raw logits. The two sides'
    # fp32 logits differ by matmul order (~1e-5 on O(1) logits) and the log-sum-exp over the vocabulary
    # adds its own rounding: 1e-4 absolute, where a wrong token's log-prob is off by O(1).
    ref = jax.nn.log_softmax(hf_logits, -1)
    ref = np.take_along_axis(ref, expected[..., None], -1)[..., 0]
    valid = result.mask[:, width:width + steps].astype(bool)
    np.testing.assert_allclose(result.logprobs[:, width:width + steps][valid], ref[valid], atol=1e-4)
    assert (result.logprobs[result.mask == 0] == 0).all()


def test_default_stop_tokens_are_every_eos_id_of_the_model_config(tiny):
    _, model = tiny
    prompts = random_prompts([5, 9], model.cfg.vocab_size)
    free = generate(model, prompts, SamplingParams(greedy=True, max_new_tokens=NEW, eos_token_ids=()))
    stop = int(free.response_tokens(0)[3])  # row 0's fourth token ends it when it is an extra eos id
    never = min(set(range(model.cfg.vocab_size)) - set(free.tokens.ravel().tolist()))  # the primary eos id
    cfg = model.cfg.replace(eos_token_id=never, extra_eos_token_ids=(stop,))
    assert (cfg.eos_token_id, cfg.extra_eos_token_ids) == (never, (stop,))
    out = generate(model_from_params(cfg, nnx.state(model)), prompts, SamplingParams(greedy=True, max_new_tokens=NEW))
    first = int(np.argmax(free.response_tokens(0) == stop))
    assert out.finished_by_eos[0] and out.lengths[0] == first + 1


def test_greedy_step_is_argmax_with_first_index_ties_and_its_log_softmax():
    """The greedy step's reductions against numpy: argmax (first index on ties, the first NaN if a
    row has one, so always a valid id) and log_softmax(z)[token] (rtol 1e-6: fp32)."""
    logits = np.array([[1.0, 3.0, 3.0, -2.0], [0.5, -1.0, 0.25, 0.5], [2.0, np.nan, 5.0, np.nan],
                       [-np.inf, -1.0, -np.inf, -1.0]], np.float32)
    greedy = SamplingParams(greedy=True).static_options()
    tokens, logp = sample_step(jnp.asarray(logits), None, greedy, 1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(tokens), [1, 0, 1, 1])
    assert np.asarray(tokens).tolist() == np.argmax(logits, axis=-1).tolist()
    finite = np.isfinite(logits).any(-1) & ~np.isnan(logits).any(-1)
    reference = (logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True))
                 - logits.max(-1, keepdims=True))
    want = reference[np.arange(4), np.argmax(logits, axis=-1)]
    np.testing.assert_allclose(np.asarray(logp)[finite], want[finite], rtol=1e-6)


def test_top_k_1_equals_greedy_for_every_sample_and_temperature_0_is_greedy(tiny):
    _, model = tiny
    prompts = random_prompts(LENGTHS, model.cfg.vocab_size, seed=1)
    greedy = generate(model, prompts, GREEDY)
    # 3 samples a prompt from one prefill: all equal to greedy when only the argmax is allowed.
    top1 = generate(model, prompts, SamplingParams(temperature=0.7, top_k=1, max_new_tokens=NEW,
                                                   eos_token_ids=(), seed=3, num_samples=3))
    np.testing.assert_array_equal(top1.tokens, np.repeat(greedy.tokens, 3, axis=0))
    np.testing.assert_array_equal(top1.mask, np.repeat(greedy.mask, 3, axis=0))
    assert (top1.logprobs == 0).all()  # one allowed token: probability 1
    cold = generate(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=NEW, eos_token_ids=()))
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)
    np.testing.assert_array_equal(cold.logprobs, greedy.logprobs)


def reference_allowed(scaled, top_k, top_p):
    """Plain-Python top-k then top-p (module docstring's definition); returns the kept ids."""
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = set(order)
    if top_k:
        kth = scaled[order[min(top_k, len(order)) - 1]]
        kept = {i for i in kept if scaled[i] >= kth}
    ranked = [i for i in order if i in kept]
    probs = np.exp(scaled[ranked] - scaled[ranked].max())
    probs /= probs.sum()
    mass, threshold = 0.0, None
    for i, p in zip(ranked, probs):
        if mass >= top_p:
            break
        threshold, mass = scaled[i], mass + p
    return {i for i in kept if scaled[i] >= threshold}, np.cumsum(probs) - probs


def test_sampled_tokens_stay_in_the_allowed_set_and_logprobs_follow_the_definition(tiny):
    _, model = tiny
    prompts = random_prompts(LENGTHS, model.cfg.vocab_size, seed=2)
    result = generate(model, prompts, SAMPLED)
    logits = full_forward_logits(model, result)
    width = result.tokens.shape[1] - NEW
    assert result.mask[:, width:].all()
    binding = Counter()
    for row in range(result.tokens.shape[0]):
        for col in range(width, width + NEW):
            scaled = logits[row, col - 1] / SAMPLED.temperature
            allowed, _ = reference_allowed(scaled, SAMPLED.top_k, SAMPLED.top_p)
            binding[len(allowed) < SAMPLED.top_k] += 1
            token = result.tokens[row, col]
            assert token in allowed
            ref = scaled[sorted(allowed)]
            ref_logp = scaled[token] - (ref.max() + np.log(np.exp(ref - ref.max()).sum()))
            np.testing.assert_allclose(result.logprobs[row, col], ref_logp, atol=1e-4)  # fp32 logits vs float64 ref
    assert binding[True] and binding[False]  # top-p cut below top-k at some steps, not at all


_filter = jax.jit(filter_logits, static_argnums=1)


@settings(max_examples=50)  # derandomized, no deadline: conftest's profile
@given(logits=st.lists(st.floats(-4, 4, width=32, allow_subnormal=False),  # XLA flushes them to 0
                       min_size=8, max_size=8),
       top_k=st.integers(0, 9), top_p=st.floats(0.01, 1.0))
def test_filter_logits_matches_plain_python(logits, top_k, top_p):
    scaled = np.asarray(logits, np.float32)
    allowed, mass_before = reference_allowed(scaled, top_k, top_p)
    assume(np.abs(mass_before - top_p).min() > 1e-4)  # float rounding decides exact boundary cases
    out = np.asarray(_filter(jnp.asarray(scaled)[None], top_k, None if top_p == 1.0 else top_p))[0]
    assert set(np.flatnonzero(np.isfinite(out))) == allowed
    np.testing.assert_array_equal(out[sorted(allowed)], scaled[sorted(allowed)])


SPREAD = [299, 3, 128, 127, 200, 256, 10, 257]  # over three 128-token blocks of a 300-token vocabulary


@pytest.mark.parametrize("vocab", [8, 300])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (1.5, 6, 1.0), (0.7, 0, 0.8),
                                                       (1.3, 6, 0.85)])
def test_sampled_frequencies_pass_chi_square(temperature, top_k, top_p, vocab):
    """20000 draws from a fixed 8-token distribution with the sampler's per-row keys against
    softmax(filtered(logits / T)); never a token outside the allowed set. With ``vocab`` 300 the
    8 tokens sit in different blocks of the inverse-CDF search, the others have weight 0."""
    probs8 = np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.07, 0.04, 0.02], np.float32)
    logits = np.log(probs8) if vocab == 8 else np.full(vocab, -1e9, np.float32)
    if vocab != 8:
        logits[SPREAD] = np.log(probs8)
    draws = 20000
    keys = row_keys(np.uint32(11), jnp.arange(draws), 1)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 0)
    static = StaticOptions(greedy=False, top_k=top_k, filter_top_p=top_p < 1)
    tokens, logp = jax.jit(sample_step, static_argnums=2)(
        jnp.broadcast_to(jnp.asarray(logits), (draws, vocab)), keys, static, temperature, top_p)
    tokens, logp = np.asarray(tokens), np.asarray(logp)
    scaled = logits / temperature
    allowed, _ = reference_allowed(scaled, top_k, top_p)
    allowed = sorted(i for i in allowed if scaled[i] > -1e6)  # weight-0 tokens: never drawn (below)
    probs = np.exp(scaled[allowed].astype(np.float64) - scaled[allowed].max())
    probs /= probs.sum()
    assert set(tokens) <= set(allowed)
    counts = np.array([(tokens == t).sum() for t in allowed])
    assert stats.chisquare(counts, probs * draws).pvalue > 1e-3
    np.testing.assert_allclose(logp, np.log(probs)[np.searchsorted(allowed, tokens)], atol=1e-5)  # fp32 rounding


_inverse_cdf = jax.jit(inverse_cdf_sample, static_argnums=2)


def _reference_inverse_cdf(w: np.ndarray, u0: float, u1: float, block: int):
    """(index, distance of each target to its nearest running total) by float64 loops."""
    size = min(block, w.size)
    padded = np.zeros(-(-w.size // size) * size)
    padded[:w.size] = w
    grid = padded.reshape(-1, size)

    def first_above(masses, u):
        target, running = u * sum(masses), 0.0
        for i, mass in enumerate(masses):
            running += mass
            if running > target:
                return i, min(abs(np.cumsum(masses) - target)) / sum(masses)
        raise AssertionError("u < 1 always lands inside")

    b, gap_block = first_above(grid.sum(1), u0)
    j, gap_entry = first_above(grid[b], u1)
    return b * size + j, min(gap_block, gap_entry)


@settings(max_examples=60)  # derandomized, no deadline: conftest's profile
@given(weights=st.lists(st.sampled_from([0.0, 0.0, 1e-3, 0.5, 1.0, 3.0]), min_size=1, max_size=40),
       uniforms=st.lists(st.tuples(*[st.floats(0.0, 1.0, exclude_max=True, width=32)] * 2), min_size=1, max_size=8),
       block=st.sampled_from([1, 4, 7, 128]))
def test_inverse_cdf_sample_matches_a_plain_python_search(weights, uniforms, block):
    """Block by the first running block total above u_0 x total, then the entry by the first
    running total above u_1 x the block's mass (float64 loops), every row its own weights; an
    entry of weight 0 is never returned, even at u = 0 or u -> 1."""
    assume(sum(weights) > 0)
    below_one = float(np.nextafter(np.float32(1), np.float32(0)))
    u = np.asarray(uniforms + [(0.0, 0.0), (below_one, below_one)], np.float32)
    w = np.stack([np.roll(np.asarray(weights, np.float32), r) for r in range(len(u))])  # rows differ
    got = np.asarray(_inverse_cdf(jnp.asarray(w), jnp.asarray(u), block))
    for row, index in enumerate(got):
        assert w[row, index] > 0
        expected, gap = _reference_inverse_cdf(w[row].astype(np.float64), float(u[row, 0]), float(u[row, 1]), block)
        if gap > 1e-5:  # float32 sums decide exact ties
            assert index == expected, (row, index, expected)
    # Targets just outside [0, total), as float rounding of the sums can make them, are clipped
    # to the first / last entry of positive weight (never a zero-weight or padding entry).
    edges = np.asarray(_inverse_cdf(jnp.asarray(w[:2]), jnp.asarray([[-1e-6, -1e-6], [1.0, 1.0]]), block))
    assert list(edges) == [np.flatnonzero(w[0])[0], np.flatnonzero(w[1])[-1]]


def test_rng_is_per_row_and_reproducible(tiny):
    _, model = tiny
    vocab = model.cfg.vocab_size
    params = SAMPLED
    prompts = random_prompts(LENGTHS, vocab, seed=1)
    first = generate(model, prompts, params)
    again = generate(model, prompts, params)
    for field in dataclasses.fields(first):
        np.testing.assert_array_equal(getattr(first, field.name), getattr(again, field.name))
    tokens, logprobs, mask = again  # the stable API's unpacking
    assert tokens is again.tokens and logprobs is again.logprobs and mask is again.mask
    # Other prompts in the batch (same bucketed shapes) do not change prompt 0's samples.
    others = [prompts[0]] + random_prompts(LENGTHS[1:], vocab, seed=9)
    mixed = generate(model, others, params)
    np.testing.assert_array_equal(mixed.tokens[:3], first.tokens[:3])
    np.testing.assert_array_equal(mixed.logprobs[:3], first.logprobs[:3])
    # The samples of a prompt differ, and a new seed gives new samples.
    assert (first.tokens[0] != first.tokens[1]).any()
    reseeded = generate(model, prompts, dataclasses.replace(params, seed=8))
    assert (reseeded.tokens != first.tokens).any()


def test_batches_keep_the_callers_order_and_samples_do_not_depend_on_the_batching(tiny):
    _, model = tiny
    prompts = random_prompts(LENGTHS, model.cfg.vocab_size, seed=3)
    single = generate(model, prompts, SAMPLED)
    finished = []
    chunked = generate(model, prompts, SAMPLED, batch_size=2, on_batch=finished.append)  # sorted by length, then restored
    assert finished == [2] * (len(prompts) // 2) + [1] * (len(prompts) % 2)  # each batch reported as it ends
    # Other batch shapes may change the last bits of the logits (documented); on these prompts
    # no sample sits on a boundary, so the draws are identical.
    np.testing.assert_array_equal(chunked.tokens, single.tokens)
    np.testing.assert_allclose(chunked.logprobs, single.logprobs, atol=1e-5)


def test_rows_stop_at_the_models_context(tiny):
    _, model = tiny
    context = model.cfg.max_position_embeddings
    prompts = random_prompts([context - 3, context - 5], model.cfg.vocab_size, seed=5)
    # A limit far beyond the context: rows stop when the context is full, the cache and the
    # output are sized by the room the context leaves after the shortest prompt.
    result = generate(model, prompts, dataclasses.replace(GREEDY, max_new_tokens=100_000))
    np.testing.assert_array_equal(result.lengths, [3, 5])
    assert not result.finished_by_eos.any()
    assert result.tokens.shape == (2, context + 5)


def test_compilations_stay_within_the_bucket_count(tiny):
    _, model = tiny
    vocab = model.cfg.vocab_size
    rng = np.random.default_rng(0)
    before = dict(TRACE_COUNTS)
    shapes = set()
    for batch in range(8):  # temperature, top_p, max_new_tokens, EOS ids and seed are runtime values
        count = int(rng.integers(1, 6))
        lengths = rng.integers(1, 30, count)
        params = dataclasses.replace(
            SAMPLED, temperature=float(rng.uniform(0.5, 1.5)), top_p=float(rng.uniform(0.5, 0.99)),
            max_new_tokens=int(rng.integers(1, 16)), seed=batch, eos_token_ids=(2, int(rng.integers(3, 9))))
        generate(model, random_prompts(lengths, vocab, seed=batch), params, batch_size=2)
        for start in range(0, count, 2):  # the batches generate() runs (sorted by length)
            chunk = sorted(lengths)[start:start + 2]
            shapes.add((batch_bucket(len(chunk)), bucket(max(chunk), PROMPT_BUCKETS)))
    for name in ("prefill", "decode"):  # at most one program per (batch bucket, prompt bucket) seen
        assert TRACE_COUNTS[name] - before.get(name, 0) <= len(shapes)


def test_a_given_batch_size_bounds_the_rows_of_every_batch(tiny, monkeypatch):
    """The KV cache is sized for at most ``batch_size`` prompts (3 here, not the power of two 4);
    without one, a batch pads to a power of two (programs shared across prompt counts)."""
    from icegrt_jax import sampling

    _, model = tiny
    rows, prefill = [], sampling._prefill
    monkeypatch.setattr(sampling, "_prefill", lambda *a, **k: (rows.append(a[3].shape[0]), prefill(*a, **k))[1])
    prompts = random_prompts([5, 7, 9, 4, 6], model.cfg.vocab_size, seed=0)
    chunked = generate(model, prompts, GREEDY, batch_size=3)
    assert rows == [3, 2]
    whole = generate(model, prompts[:3], GREEDY)
    assert rows[2:] == [4]
    np.testing.assert_array_equal(whole.tokens, generate(model, prompts[:3], GREEDY, batch_size=3).tokens)
    assert chunked.tokens.shape[0] == 5


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["one sample", "three samples"])
def test_the_decode_loop_updates_the_prefilled_cache_in_place(tiny, options):
    """One KV cache while decoding: the prefill's (already repeated per sample) is donated to the
    decode loop and aliased to the loop's own. A cache that is not donated is copied before the
    loop: two caches at the peak, one more than ``icegrt plan`` counts."""
    _, model = tiny
    graphdef, params = nnx.split(model)
    prompts = np.ones((8, 16), np.int32)  # the shapes of the tests above: batch bucket 8, P = N = 16
    logits, cache = _prefill(graphdef, params, _inference_weights(graphdef, params), prompts, prompts,
                             new_slots=16, num_samples=options.num_samples)
    assert cache[0]["k"].shape[0] == 8 * options.num_samples
    cache_bytes = sum(x.nbytes for layer in cache for x in layer.values())
    rows = np.arange(8, dtype=np.int32)
    args = (graphdef, params, _inference_weights(graphdef, params), cache, logits, prompts, rows,
            np.full(8, NEW, np.int32), np.uint32(0), np.float32(1), np.float32(1), np.int32(0),
            np.full(4, -1, np.int32))
    compiled = _decode_program().lower(*args, static=options.static_options(),
                                       num_samples=options.num_samples).compile()
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes == cache_bytes
    assert memory.temp_size_in_bytes < cache_bytes


def test_each_cpu_decode_option_is_probed_on_its_own():
    """The CPU decode options are experimental XLA flags, probed one at a time (``_decode_program``
    keeps those accepted): an unknown flag is refused, a known one accepted."""
    from icegrt_jax import sampling

    assert not sampling._accepted({"xla_cpu_no_such_option": 1})
    assert sampling._accepted({"xla_disable_hlo_passes": "tree_reduction_rewriter"})


@pytest.mark.parametrize("make, message", [
    (lambda: SamplingParams(max_new_tokens=0), "max_new_tokens"),
    (lambda: SamplingParams(max_new_tokens=-3), "max_new_tokens"),
    (lambda: SamplingParams(temperature=-0.5), "temperature"),
    (lambda: SamplingParams(temperature=1e-40), "temperature must be 0 .greedy. or a finite number >= 1e-05"),
    (lambda: SamplingParams(temperature=float("inf")), "temperature"),
    (lambda: SamplingParams(top_p=0.0), "top_p"),
    (lambda: SamplingParams(top_p=1.5), "top_p"),
    (lambda: SamplingParams(top_k=-1), "top_k"),
    (lambda: SamplingParams(num_samples=0), "num_samples"),
])
def test_bad_sampling_params_raise_clear_errors(make, message):
    with pytest.raises(SamplingError, match=message):
        make()


@pytest.mark.parametrize("prompts, message", [
    ([], "empty"),
    ([[5, 6], []], "prompt 1 is empty"),
    ([[5] * 256], "prompt 0 has 256 tokens; the model's context is 256"),
    ([[5, 96]], "outside"),
])
def test_bad_prompts_raise_clear_errors(tiny, prompts, message):
    _, model = tiny
    with pytest.raises(UserInputError, match=message):
        generate(model, prompts, SamplingParams())


@pytest.mark.parametrize("pad_id", [-1, 96])
def test_a_pad_id_outside_the_vocabulary_is_refused(tiny, pad_id):
    """Padding is fed to the model under the mask: an id with no embedding row (jnp.take fills
    NaN) would turn every padded row's attention into NaN."""
    _, model = tiny
    with pytest.raises(SamplingError, match=rf"pad_id {pad_id} is outside the model's vocabulary \[0, 96\)"):
        generate(model, [[5, 6], [7]], SamplingParams(pad_id=pad_id))


def test_a_negative_pad_token_id_in_the_config_pads_with_0(tiny):
    """LLaMA-1 configs say pad_token_id -1: the default padding is then token 0 (masked anyway)."""
    _, model = tiny
    options = SamplingParams(greedy=True, max_new_tokens=4, eos_token_ids=())
    expected = generate(model, [[5, 6], [7]], dataclasses.replace(options, pad_id=0))
    original, model.cfg = model.cfg, model.cfg.replace(pad_token_id=-1)
    try:
        result = generate(model, [[5, 6], [7]], options)
    finally:
        model.cfg = original
    np.testing.assert_array_equal(result.tokens, expected.tokens)


def test_accepts_graphdef_and_params(tiny):
    _, model = tiny
    prompts = random_prompts(LENGTHS, model.cfg.vocab_size)
    params = GREEDY
    np.testing.assert_array_equal(generate(nnx.split(model), prompts, params).tokens,
                                  generate(model, prompts, params).tokens)
