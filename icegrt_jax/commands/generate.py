"""``icegrt generate --model DIR (--prompts FILE | --prompt TEXT) --out FILE.jsonl``: sample responses.

Prompts: ``--prompt TEXT`` (repeatable) or ``--prompts FILE`` whose records (JSONL, Parquet, Arrow;
see ``icegrt_jax.data.sources``) each have a string field ``prompt``; other fields are copied to
the output. Each prompt is wrapped in the paper's template (``--no-template``: BOS + raw text)
and tokenised exactly as in SFT. The output has one JSON line per prompt, in input order::

    {..input fields.., "prompt": str, "responses": [{"text": str, "num_tokens": int,
     "finished_by_eos": bool, "logprob": float}, ...]}   # num_samples responses

``logprob`` is the sum of the sampled tokens' log-probs (see ``icegrt_jax.sampling``).

``icegrt sample --model DIR --prompts FILE --n 5 --out FILE.jsonl`` writes the annotation input of
the paper's data collection instead: per prompt ``{"prompt_id", "prompt", "responses": [n texts in
a random order, seeded], "truncated": [n flags: the response hit the length limit before an end
token], "sampling": {...settings, "model"}}``. Labelers add ``"rankings"`` (one
best-first list of response indices each) and the file becomes ICE-Reward training data
(``icegrt_jax.data.preferences``); the input record's other fields are kept. ``prompt_id`` is the
record's ``prompt_id`` or ``id`` field, else where the record is, as errors name it: its JSONL line
number (1-based, blank lines counted), its Parquet or Arrow row (0-based), or the ``--prompt``'s
number (1-based).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from icegrt_jax import files
from icegrt_jax.errors import UserInputError


def register(subparsers):
    import argparse

    generate = subparsers.add_parser("generate", help="sample responses from a model",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_arguments(generate, samples_flag="--num-samples", default_samples=1)
    generate.add_argument("--greedy", action="store_true", help="argmax decoding")
    generate.set_defaults(func=run)
    sample = subparsers.add_parser("sample", help="n responses a prompt in random order, for annotators to rank",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_arguments(sample, samples_flag="--n", default_samples=5)
    sample.set_defaults(func=run_sample, greedy=False)


def _add_arguments(parser, samples_flag: str, default_samples: int):
    parser.add_argument("--model", required=True, help="an HF LLaMA directory or a project checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="records with a 'prompt' field (.jsonl, .parquet, .arrow)")
    source.add_argument("--prompt", action="append", help="a prompt text (repeatable)")
    parser.add_argument("--out", required=True, help="output JSONL (written atomically)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    parser.add_argument("--no-template", action="store_true", help="do not wrap prompts in the paper's template")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="0 means greedy (the model's generation_config.json is not read: these flags decide)")
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k (transformers' default is 50)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus mass in (0, 1]; 1 disables it; tokens tied with the last kept one are kept")
    parser.add_argument(samples_flag, dest="num_samples", type=int, default=default_samples,
                        help=f"responses per prompt (default {default_samples}; the paper ranks 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter and compute dtype")


def run(args) -> int:
    records, _, responses, params = sample_responses(args)
    files.write_jsonl(args.out, ({**record, "responses": rows} for record, rows in zip(records, responses)),
                      ensure_ascii=False)
    print(f"wrote {len(records)} prompts x {params.num_samples} responses to {args.out}")
    return 0


def run_sample(args) -> int:
    import numpy as np

    records, numbers, responses, params = sample_responses(args)
    settings = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                "max_new_tokens": params.max_new_tokens, "seed": params.seed, "model": args.model}
    lines = []
    for i, (record, number, rows) in enumerate(zip(records, numbers, responses)):
        order = np.random.default_rng((params.seed, i)).permutation(len(rows))
        prompt_id = record.get("prompt_id", record.get("id", number))
        lines.append({**record, "prompt_id": str(prompt_id), "prompt": record["prompt"],
                      "responses": [rows[j]["text"] for j in order],
                      "truncated": [not rows[j]["finished_by_eos"] for j in order], "sampling": settings})
    files.write_jsonl(args.out, lines, ensure_ascii=False)
    print(f"wrote {len(records)} prompts x {params.num_samples} responses (random order) to {args.out}")
    return 0


def check_flags(args) -> None:
    """Flags that contradict each other are an error, not one of them silently ignored."""
    sampling = [f for f, given in (("--temperature", args.temperature != 1.0), ("--top-k", args.top_k != 0),
                                   ("--top-p", args.top_p != 1.0)) if given]
    if args.greedy and sampling:
        raise UserInputError(f"--greedy decodes by argmax and ignores {', '.join(sampling)}: give one or the other")
    if (args.greedy or args.temperature == 0) and args.num_samples > 1:
        raise UserInputError(f"greedy decoding ({'--greedy' if args.greedy else '--temperature 0'}) gives "
                             f"{args.num_samples} identical responses a prompt: sample (temperature > 0) or ask for 1")


def sample_responses(args):
    """(records, their line/row/--prompt numbers, per-record lists of {text, num_tokens,
    finished_by_eos, logprob}, SamplingParams); everything is checked before the weights are loaded."""
    from icegrt_jax import checkpoint, hf
    from icegrt_jax.data.templates import ICEGRT, RAW
    from icegrt_jax.data.tokenize import decode_response, load_tokenizer, pad_token_id
    from icegrt_jax.sampling import SamplingParams, check_prompts, generate

    check_flags(args)
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
        max_new_tokens=args.max_new_tokens, num_samples=args.num_samples, seed=args.seed)
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be positive, got {args.batch_size}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UserInputError(f"--out {args.out}: directory {out_dir} does not exist")
    if os.path.isdir(args.out):
        raise UserInputError(f"--out {args.out}: is a directory; give the path of the JSONL file to write")
    files.check_writable(args.out)
    records, places, numbers = _read_prompts(args)
    if not os.path.isdir(args.model):
        raise UserInputError(f"--model {args.model}: no such model directory")
    hf.read_config_kind(args.model)  # a run directory is named as one, before its tokenizer is looked for
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    overrides = {"param_dtype": args.dtype, "dtype": args.dtype} if args.dtype else {}
    cfg = hf.load_hf_config(args.model, **overrides)
    if len(tokenizer) > cfg.vocab_size:
        raise UserInputError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                             f"{cfg.vocab_size}; pass the model's own tokenizer with --tokenizer")
    prompts = check_prompts([_encode(tokenizer, None if args.no_template else ICEGRT, r["prompt"])
                             for r in records], cfg, labels=[f"{where}: the prompt" for where in places])
    eos = tuple(sorted({i for i in (tokenizer.eos_token_id, *cfg.eos_token_ids) if i is not None}))
    params = dataclasses.replace(params, eos_token_ids=eos, pad_id=pad_token_id(tokenizer))

    cfg, model_params = checkpoint.load_model_dir(args.model, progress=True, **overrides)
    result = generate(hf.model_from_params(cfg, model_params), prompts, params,
                      batch_size=args.batch_size, progress=True)
    responses = []
    for i in range(len(records)):
        rows = []
        for row in range(i * params.num_samples, (i + 1) * params.num_samples):
            text = decode_response(tokenizer, RAW if args.no_template else ICEGRT, result.response_tokens(row),
                                   result.finished_by_eos[row])
            rows.append({"text": text,
                         "num_tokens": int(result.lengths[row]),
                         "finished_by_eos": bool(result.finished_by_eos[row]),
                         "logprob": float(result.logprobs[row].sum())})
        responses.append(rows)
    cut = int((~result.finished_by_eos).sum())
    if cut:
        print(f"{cut} of {len(result.lengths)} responses ended at the length limit (--max-new-tokens "
              f"{params.max_new_tokens} or the model's context) before an end token", file=sys.stderr)
    return records, numbers, responses, params


def _read_prompts(args) -> tuple[list[dict], list[str], list[int]]:
    """The prompt records, where each came from (``file:line``, ``file row i`` or ``--prompt number
    N``) and that number."""
    from icegrt_jax.data.sources import DataError, numbered_records, required_text

    if args.prompt is not None:
        for i, text in enumerate(args.prompt):
            if not text.strip():
                raise UserInputError(f"--prompt number {i + 1} is empty")
        numbers = list(range(1, len(args.prompt) + 1))
        return [{"prompt": text} for text in args.prompt], [f"--prompt number {n}" for n in numbers], numbers
    records, places, numbers = [], [], []
    for number, where, record in numbered_records(args.prompts):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object, got {type(record).__name__}")
        required_text(record, "prompt", where)
        if "responses" in record:  # the output adds this field: it would replace the record's own
            raise DataError(f"{where}: the record already has a 'responses' field (an output of generate?)")
        records.append(dict(record))
        places.append(str(where))
        numbers.append(number)
    if not records:
        raise DataError(f"{args.prompts}: no prompts")
    return records, places, numbers


def _encode(tokenizer, template, text: str):
    """BOS + the prompt (in ``template``; as-is without one), tokenised as in training."""
    from icegrt_jax.data.templates import RAW
    from icegrt_jax.data.tokenize import tokenize_prompt

    return tokenize_prompt(tokenizer, template or RAW, text)

