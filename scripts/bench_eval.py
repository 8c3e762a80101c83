"""Log-likelihood scoring throughput: our lm-eval backend (``icegrt``) vs lm-eval's ``hf`` backend.

Both score the same requests with the same random weights (config bench-small, a transformers
LlamaForCausalLM saved with save_pretrained; ours loads that directory) and the same tokenizer
(a byte-level BPE trained here on the synthetic text). The requests mimic the two shapes of the
paper's log-likelihood benchmarks:

- MMLU-like: a ~5-shot context and the four continuations " A" .. " D" (one token: both
  backends score the four with one forward pass);
- ARC/HellaSwag-like: a shorter context and four multi-token continuations.

One warm-up call each (it compiles ours), then the two alternate call by call ``--repeats``
times, so load from other processes on a shared machine hits both alike; each figure is the
fastest call and ``ratio_median`` the median of the per-pair ratios.

    python scripts/bench_eval.py [--threads 2] [--repeats 3] [--batch-size 16] [--questions 32]

Prints one JSON object: requests/s of each, the ratio ours / hf, and the largest difference of
the log-likelihoods (a parity check on these requests).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

WORDS = ("the", "a", "of", "to", "and", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from",
         "that", "this", "which", "river", "forest", "number", "energy", "cell", "planet", "water", "light",
         "heat", "sound", "motion", "force", "metal", "animal", "plant", "student", "teacher", "city",
         "country", "year", "time", "people", "work", "answer", "question", "reason", "result")


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def build_model_dir(path: str, corpus: list[str], vocab: int) -> None:
    """bench-small random weights (transformers) and a byte-level BPE tokenizer, in ``path``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from icegrt_jax.models.llama import preset

    cfg = preset("bench-small")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3)
    transformers.LlamaForCausalLM(hf_cfg).eval().save_pretrained(path)

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>", pad_token="<pad>").save_pretrained(path)


def make_requests(questions: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context, continuation) pairs: ``questions`` MMLU-like and as many ARC-like, 4 choices each."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(questions):
        shots = "".join(f"{sentence(rng, 25)}\nA. x\nB. y\nC. z\nD. w\nAnswer: {rng.choice('ABCD')}\n\n"
                        for _ in range(5))
        context = shots + sentence(rng, 25) + "\nA. x\nB. y\nC. z\nD. w\nAnswer:"
        pairs += [(context, f" {letter}") for letter in "ABCD"]
    for _ in range(questions):
        context = "Question: " + sentence(rng, rng.randint(20, 60)) + "\nAnswer:"
        pairs += [(context, " " + sentence(rng, rng.randint(3, 12))) for _ in range(4)]
    return pairs


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--questions", type=int, default=32, help="questions of each shape (4 requests each)")
    args = parser.parse_args(argv)

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from icegrt_jax.eval.lm_eval_backend import IceGRTLM

    torch.set_num_threads(args.threads)
    pairs = make_requests(args.questions)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    with tempfile.TemporaryDirectory() as tmp:
        build_model_dir(tmp, [c + k for c, k in pairs], vocab=2000)
        ours = IceGRTLM(pretrained=tmp, batch_size=args.batch_size)
        theirs = HFLM(pretrained=tmp, backend="causal", device="cpu", batch_size=args.batch_size, dtype="float32")

    def score(lm):
        return lm.loglikelihood(requests, disable_tqdm=True)

    got, want = score(ours), score(theirs)  # warm-up (compiles ours) and parity
    pairs_s = [(seconds(lambda: score(ours)), seconds(lambda: score(theirs))) for _ in range(args.repeats)]
    ours_s, theirs_s = min(o for o, _ in pairs_s), min(t for _, t in pairs_s)
    contexts = [len(ours.tok_encode(c)) for c, _ in pairs]
    result = {
        "requests": len(requests),
        "shape": (f"{args.questions} MMLU-like (5-shot, 1-token answers) + {args.questions} ARC-like "
                  f"(multi-token answers) questions x 4 choices; context tokens {min(contexts)}-{max(contexts)}; "
                  f"bench-small fp32, batch size {args.batch_size}"),
        "icegrt_requests_per_s": len(requests) / ours_s,
        "hf_requests_per_s": len(requests) / theirs_s,
        "ratio": theirs_s / ours_s,
        "ratio_median": statistics.median(t / o for o, t in pairs_s),
        "max_abs_loglikelihood_diff": max(abs(g[0] - w[0]) for g, w in zip(got, want)),
        "greedy_flags_identical": [g[1] for g in got] == [w[1] for w in want],
        "torch_threads": args.threads,
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
