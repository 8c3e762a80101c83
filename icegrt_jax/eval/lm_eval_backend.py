"""lm-evaluation-harness backend over our JAX LLaMA: ``IceGRTLM``, registered as model ``icegrt``.

Use it from Python (importing this module registers the name)::

    import lm_eval, icegrt_jax.eval.lm_eval_backend
    lm_eval.simple_evaluate(model="icegrt", model_args="pretrained=DIR,batch_size=16", tasks=[...])

or from the command line as lm-eval's own CLI with the model registered::

    python -m icegrt_jax.eval.lm_eval_backend run --model icegrt --model_args pretrained=DIR --tasks arc_easy

``DIR`` is an HF safetensors directory or a project checkpoint (``checkpoint.load_model_dir``).

Scoring (``loglikelihood``, ``loglikelihood_rolling``). Tokenisation follows lm-eval's ``hf``
backend exactly (``TemplateLM`` splits context and continuation; an empty context becomes the
BOS token, else EOS). A request's tokens ``x = (context + continuation)[-(max_length + 1):]``
feed ``x[:-1]``; position ``t`` predicts ``x[t + 1]`` and the answer is
``(sum_t log p(x[t + 1] | x[:t + 1]), all_t x[t + 1] == argmax)`` over the continuation's
positions. Requests with the same input ``x[:-1]`` (the choices of a multiple-choice question
whose answers are one token, such as MMLU's letters) differ only in the last target, so one
forward pass answers them all: the jitted ``score_batch`` returns the sum over the other
positions and the log-softmax at the last one. Inputs are sorted longest first and batched
``batch_size`` at a time; batch shapes are bucketed (width: ``SCORING_WIDTHS``, two an octave from 16 (16, 24, 32, 48, ...),
capped at ``max_length``; rows: powers of two, capped at ``batch_size``), so compilations stay few.

Generation (``generate_until``) runs our sampler (``icegrt_jax.sampling.generate``) per group of
identical generation kwargs: greedy unless ``do_sample``; ``temperature``, ``top_p``, ``top_k``
as given (not given: no top-p or top-k filtering, as lm-eval's vLLM backend; its hf backend gets
transformers' default top_k of 50); up to ``max_gen_toks`` new tokens; the prompt left-truncated to
``max_length - max_gen_toks``. The decoded text is cut at the first stop string (lm-eval's
``postprocess_generated_text``). Stop strings that are a single token also end a row early,
which cannot change the cut text (see ``early_stop_ids``).

Both left-truncations (a scoring request longer than ``max_length + 1`` tokens, a prompt longer
than ``max_length - max_gen_toks``) are lm-eval's ``hf`` behaviour. They are counted per request
type in ``IceGRTLM.truncated`` and logged as a warning with the count; ``icegrt eval`` reports
them in results.json and results.md.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from icegrt_jax.eval import require_lm_eval

require_lm_eval()

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from icegrt_jax.errors import UserInputError
from icegrt_jax.losses import token_logprobs
from icegrt_jax.models.llama import Llama
from icegrt_jax.sampling import SamplingParams, batch_bucket, bucket, generate

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
SAMPLING_KWARGS = ("do_sample", "temperature", "top_p", "top_k")
# Scoring widths: two per octave from 16 (16, 24, 32, 48, ...), so padding stays under a third.
SCORING_WIDTHS: tuple[int, ...] = tuple(sorted({w for k in range(4, 18) for w in (2 ** k, 3 * 2 ** (k - 1))}))


class ScoringRow(NamedTuple):
    """One model input (``x[:-1]``), its number of continuation targets, and the requests it
    answers as (request index, last continuation token)."""

    inputs: tuple[int, ...]
    num_continuation: int
    requests: list[tuple[int, int]]


def scoring_rows(token_pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int) -> list[ScoringRow]:
    """Requests (context ids, continuation ids) grouped by model input, longest input first."""
    rows: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for index, (context, continuation) in enumerate(token_pairs):
        if not context or not continuation or len(continuation) > max_length:
            raise UserInputError(f"request {index}: need a non-empty context and 1..{max_length} continuation "
                                 f"tokens, got {len(context)} and {len(continuation)} (raise --max-length?)")
        tokens = (list(context) + list(continuation))[-(max_length + 1):]
        rows[(tuple(tokens[:-1]), len(continuation))].append((index, tokens[-1]))
    return sorted((ScoringRow(inputs, n, requests) for (inputs, n), requests in rows.items()),
                  key=lambda row: -len(row.inputs))


def pad_rows(rows: Sequence[ScoringRow], width: int, num_rows: int, pad_id: int):
    """(tokens [R, W], lengths [R], num_continuation [R]) int32, right-padded; extra rows are one
    pad token with nothing to score."""
    tokens = np.full((num_rows, width), pad_id, np.int32)
    lengths = np.ones((num_rows,), np.int32)
    num_continuation = np.ones((num_rows,), np.int32)
    for r, row in enumerate(rows):
        tokens[r, :len(row.inputs)] = row.inputs
        lengths[r], num_continuation[r] = len(row.inputs), row.num_continuation
    return tokens, lengths, num_continuation


@functools.partial(jax.jit, static_argnames="graphdef")
def score_batch(graphdef, params, tokens, lengths, num_continuation):
    """Per row of right-padded inputs ``tokens`` [R, W] with ``L = lengths`` and ``n = num_continuation``:

    - ``prefix_logprob`` [R]: sum of ``log p(tokens[t + 1])`` over ``t in [L - n, L - 1)``, the
      continuation targets before the last;
    - ``prefix_greedy`` [R]: whether each of those targets is the argmax;
    - ``last_logprobs`` [R, V]: ``log_softmax`` at position ``L - 1``, which scores the last target.
    """
    model = nnx.merge(graphdef, params)
    positions = jnp.arange(tokens.shape[1])
    key_mask = (positions < lengths[:, None]).astype(jnp.int32)
    logits, _ = model(tokens, key_mask)
    targets = jnp.roll(tokens, -1, axis=1)  # the wrapped last column is never a prefix target
    in_prefix = (positions >= (lengths - num_continuation)[:, None]) & (positions < (lengths - 1)[:, None])
    prefix_logprob = jnp.sum(jnp.where(in_prefix, token_logprobs(logits, targets), 0.0), axis=1)
    prefix_greedy = jnp.all(jnp.where(in_prefix, jnp.argmax(logits, axis=-1) == targets, True), axis=1)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return prefix_logprob, prefix_greedy, jax.nn.log_softmax(last, axis=-1)


def row_answers(rows: Sequence[ScoringRow], prefix_logprob, prefix_greedy, last_logprobs):
    """Yield (request index, (log-likelihood, is_greedy)) for every request of ``rows``."""
    for r, row in enumerate(rows):
        best = int(np.argmax(last_logprobs[r]))
        for index, token in row.requests:
            yield index, (float(prefix_logprob[r]) + float(last_logprobs[r, token]),
                          bool(prefix_greedy[r]) and best == token)


def early_stop_ids(tokenizer, stops: Sequence[str]) -> tuple[int, ...]:
    """Ids of the stop strings ``s`` that are one token, for rows to end at.

    Ending at such a token leaves the cut text unchanged: the text is cut at or before the first
    ``s``, and only a stop string spanning the token's end could see text after it; we keep ``s``
    only when no other stop string contains its last character, which rules that out.
    """
    ids = []
    for stop in stops:
        encoded = tokenizer.encode(stop, add_special_tokens=False)
        others = [t for t in stops if t != stop]
        if len(encoded) == 1 and tokenizer.decode(encoded) == stop and not any(stop[-1] in t for t in others):
            ids.append(encoded[0])
    return tuple(dict.fromkeys(ids))


def sampling_params(gen_kwargs: dict, max_new_tokens: int, eos_token_ids: tuple[int, ...], seed: int):
    """``SamplingParams`` from normalised lm-eval generation kwargs (other keys are ignored, with a warning)."""
    ignored = sorted(set(gen_kwargs) - set(SAMPLING_KWARGS))
    if ignored:
        log.warning("icegrt backend ignores generation kwargs %s", ignored)
    return SamplingParams(
        greedy=not gen_kwargs.get("do_sample"), temperature=float(gen_kwargs.get("temperature") or 0.0),
        top_p=float(gen_kwargs.get("top_p") or 1.0), top_k=int(gen_kwargs.get("top_k") or 0),
        max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids, seed=seed)


def _load_model(pretrained, dtype: str | None) -> Llama:
    if isinstance(pretrained, Llama):
        return pretrained
    from icegrt_jax.checkpoint import load_model_dir
    from icegrt_jax.hf import model_from_params

    overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    cfg, params = load_model_dir(str(pretrained), **overrides)
    return model_from_params(cfg, params)


def _load_tokenizer(tokenizer, pretrained):
    """``tokenizer`` (an object or a directory), else the tokenizer in the model directory."""
    if tokenizer is None:
        if isinstance(pretrained, Llama):
            raise UserInputError("icegrt backend: pass `tokenizer` (a directory or tokenizer) with an in-memory model")
        tokenizer = str(pretrained)
    if isinstance(tokenizer, str):
        from icegrt_jax.data.tokenize import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def _batch_size(value) -> int:
    """lm-eval passes ints, numeric strings or ``auto[:N]``; auto means ``DEFAULT_BATCH_SIZE``."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    if int(value) < 1:
        raise UserInputError(f"icegrt backend: batch_size must be positive, got {value!r}")
    return int(value)


@register_model("icegrt")
class IceGRTLM(TemplateLM):
    """Our ``Llama`` behind lm-eval's ``LM`` interface (see the module docstring).

    Args (all usable in ``model_args``):
      pretrained: model directory (HF or project checkpoint), or an in-memory ``Llama``.
      tokenizer: tokenizer directory or object (default: ``pretrained``'s directory).
      batch_size: requests (scoring) or prompts (generation) per batch; ``auto`` means 16.
      max_length: context length used (default: the model's ``max_position_embeddings``).
      max_gen_toks: new-token limit when a task does not set one.
      dtype: parameter and compute dtype override (float32 | bfloat16 | float16).
      add_bos_token: force (True/False) the tokenizer's special tokens; default: its own setting.
      seed: sampling seed for tasks that sample.
      device, max_batch_size: accepted because lm-eval passes them; JAX uses its default device.
    """

    def __init__(self, pretrained, tokenizer=None, batch_size=DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, dtype: str | None = None,
                 add_bos_token: bool | None = None, seed: int = 0, device=None, max_batch_size=None):
        super().__init__()
        model = _load_model(pretrained, dtype)
        self.cfg = model.cfg
        self._graphdef, self._params = nnx.split(model)
        self.tokenizer = _load_tokenizer(tokenizer, pretrained)
        self._batch_size = _batch_size(batch_size)
        self._max_length = int(max_length or self.cfg.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.seed = int(seed)
        self.truncated: Counter[str] = Counter()  # request type -> requests left-truncated

    def _count_truncated(self, request_type: str, truncated: int, total: int, limit: str) -> None:
        """Count and report requests whose context was left-truncated to fit ``limit``."""
        if truncated:
            self.truncated[request_type] += truncated
            log.warning("icegrt backend: %d of %d %s requests left-truncated to fit %s (as lm-eval's hf backend)",
                        truncated, total, request_type, limit)

    # --- properties lm-eval reads -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditioning token for an empty context: BOS, else EOS (as lm-eval's hf backend)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.cfg.num_params(), "model_dtype": self.cfg.param_dtype}

    # --- tokenisation (as lm-eval's hf backend) -----------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring -------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: (cache key or None, context ids, continuation ids) -> (logprob, is_greedy)."""
        rows = scoring_rows([(context, continuation) for _, context, continuation in requests], self.max_length)
        self._count_truncated("loglikelihood", sum(len(c) + len(x) > self.max_length + 1 for _, c, x in requests),
                              len(requests), f"max_length {self.max_length}")
        answers: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="icegrt loglikelihood")
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            for index, answer in self._score(chunk):
                answers[index] = answer
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
            bar.update(sum(len(row.requests) for row in chunk))
        bar.close()
        return answers

    def _score(self, rows: Sequence[ScoringRow]):
        width = min(bucket(len(rows[0].inputs), SCORING_WIDTHS), self.max_length)
        num_rows = min(batch_bucket(len(rows)), self.batch_size)
        batch = pad_rows(rows, width, num_rows, self.cfg.pad_token_id or 0)
        outputs = jax.device_get(score_batch(self._graphdef, self._params, *batch))
        return row_answers(rows, *outputs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of the log-likelihoods of each string's disjoint windows of ``max_length`` tokens,
        the first conditioned on ``prefix_token_id`` (lm-eval's rolling windows, context_len=1)."""
        windows, owners = [], []
        for doc, (string,) in enumerate(request.args for request in requests):
            token_windows = get_rolling_token_windows(token_list=self.tok_encode(string),
                                                      prefix_token=self.prefix_token_id,
                                                      max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owners.append(doc)
        totals = [0.0] * len(requests)
        for doc, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[doc] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation ----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        texts: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="icegrt generate_until")
        for indices in groups.values():
            generated = self._generate([requests[i].args[0] for i in indices], requests[indices[0]].args[1],
                                       on_batch=bar.update)
            for index, text in zip(indices, generated):
                texts[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
        bar.close()
        return texts

    def _generate(self, contexts: Sequence[str], gen_kwargs: dict, on_batch=None) -> list[str]:
        """Texts for ``contexts`` under one set of generation settings; ``on_batch(n)`` as n finish."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        stops = handle_stop_sequences(kwargs.pop("until"), eos=self.tok_decode(self.eot_token_id,
                                                                               skip_special_tokens=False))
        max_new = kwargs.pop("max_gen_toks")
        max_prompt = self.max_length - max_new
        if max_prompt < 1:
            raise UserInputError(f"icegrt backend: max_gen_toks {max_new} leaves no room for a prompt "
                                 f"in max_length {self.max_length}")
        eos_ids = tuple(dict.fromkeys((self.eot_token_id, *self.cfg.eos_token_ids,
                                       *early_stop_ids(self.tokenizer, stops))))
        params = sampling_params(kwargs, max_new, eos_ids, self.seed)
        encoded = [self.tok_encode(context) or [self.prefix_token_id] for context in contexts]
        self._count_truncated("generate_until", sum(len(ids) > max_prompt for ids in encoded), len(encoded),
                              f"max_length {self.max_length} - max_gen_toks {max_new}")
        prompts = [ids[-max_prompt:] for ids in encoded]
        result = generate((self._graphdef, self._params), prompts, params, batch_size=self.batch_size,
                          on_batch=on_batch)
        return [postprocess_generated_text(self.tok_decode(result.response_tokens(row).tolist()), stops, None)
                for row in range(len(prompts))]


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
