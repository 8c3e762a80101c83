"""Greedy generation throughput: icegrt_jax.sampling.generate vs transformers generate, same weights.

Shape of /work/shared/bench/torch_sft_generate_baseline.py's generate part: config bench-small,
16 prompts of 32 tokens, 64 new tokens, greedy, no EOS stop. Both sides run on the same random
weights (a transformers LlamaForCausalLM saved with save_pretrained; ours loads it with load_hf)
and the same prompts. Each side runs in its own fresh process (no thread pools of the other
framework around), after one warm-up call (which compiles ours), and reports its fastest of
``--repeats`` calls; the sides alternate for ``--rounds`` rounds so that load from other processes
on a shared machine hits both alike. The figure of a side is its fastest round; ``round_ratios``
shows the spread. The shared baseline script is also run once (its own weights; throughput does
not depend on them) as a cross-check of the torch figure, unless ``--no-shared-baseline``.

    python scripts/bench_generate.py [--threads 2] [--rounds 3] [--repeats 3] [--profile]

Prints one JSON object: new tokens/s of each side and the ratio ours / transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench_timing import best_time, cpu_description

SHARED_BASELINE = "/work/shared/bench/torch_sft_generate_baseline.py"
BATCH, PROMPT, NEW = 16, 32, 64


def build(path: str) -> None:
    """Random bench-small weights (transformers layout) and prompts, saved under ``path``."""
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    np.save(os.path.join(path, "prompts.npy"), np.random.default_rng(0).integers(1, 8000, (BATCH, PROMPT)))


def side_torch(path: str, args) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    prompt = torch.from_numpy(np.load(os.path.join(path, "prompts.npy")))
    kwargs = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, "eos_token_id": None,
              "pad_token_id": 0}

    def run():
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)

    np.save(os.path.join(path, "torch_tokens.npy"), run()[:, PROMPT:].numpy())
    return {"seconds": best_time(run, args.repeats)}


def side_jax(path: str, args) -> dict:
    import numpy as np
    from flax import nnx

    from icegrt_jax.hf import load_hf, model_from_params
    from icegrt_jax.sampling import SamplingParams, generate

    cfg, params = load_hf(path)
    model = nnx.split(model_from_params(cfg, params))
    prompts = list(np.load(os.path.join(path, "prompts.npy")).astype(np.int32))

    def run(new=NEW):
        return generate(model, prompts, SamplingParams(greedy=True, max_new_tokens=new, eos_token_ids=()))

    np.save(os.path.join(path, "jax_tokens.npy"), run().tokens[:, -NEW:])
    out = {"seconds": best_time(run, args.repeats)}
    if args.profile:  # decode step time from two lengths sharing one program (64-slot bucket)
        short = best_time(lambda: run(NEW // 2 + 1), args.repeats)
        step = (out["seconds"] - short) / (NEW - NEW // 2 - 1)
        weight_bytes = cfg.num_params() * np.dtype(cfg.param_dtype).itemsize
        matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # the embedding is a gather
        out["profile"] = {
            "decode_step_ms": 1e3 * step,
            "prefill_and_call_overhead_ms": 1e3 * (out["seconds"] - NEW * step),
            "weight_mb_read_per_step": weight_bytes / 1e6,
            "kv_cache_mb": 2 * cfg.num_layers * BATCH * (32 + 64) * cfg.num_kv_heads * cfg.head_dim * 4 / 1e6,
            "weight_gb_per_s": weight_bytes / step / 1e9,
            "matmul_gflop_per_s": 2 * matmul_params * BATCH / step / 1e9,
        }
    return out


def run_side(side: str, path: str, args) -> dict:
    command = [sys.executable, __file__, "--side", side, "--dir", path, "--threads", str(args.threads),
               "--repeats", str(args.repeats)] + (["--profile"] if args.profile else [])
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{side} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the baseline's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also report decode step time of ours")
    parser.add_argument("--no-shared-baseline", action="store_true")
    parser.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps((side_jax if args.side == "jax" else side_torch)(args.dir, args)))
        return 0

    import numpy as np

    with tempfile.TemporaryDirectory() as path:
        build(path)
        rounds = []
        for r in range(args.rounds):
            order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
            rounds.append({side: run_side(side, path, args) for side in order})
        same = bool((np.load(os.path.join(path, "jax_tokens.npy"))
                     == np.load(os.path.join(path, "torch_tokens.npy"))).all())
    ours = min(r["jax"]["seconds"] for r in rounds)
    theirs = min(r["torch"]["seconds"] for r in rounds)
    result = {
        "shape": f"batch {BATCH} x prompt {PROMPT} + {NEW} new tokens, greedy, bench-small fp32",
        "tokens_identical": same,
        "icegrt_jax_new_tokens_per_s": BATCH * NEW / ours,
        "transformers_new_tokens_per_s": BATCH * NEW / theirs,
        "ratio": theirs / ours,
        "round_ratios": [r["torch"]["seconds"] / r["jax"]["seconds"] for r in rounds],
        "torch_threads": args.threads,
        "cpu": cpu_description(),
        "load_average_1min": os.getloadavg()[0],
    }
    if args.profile:
        result["profile"] = min((r["jax"]["profile"] for r in rounds), key=lambda p: p["decode_step_ms"])
    if not args.no_shared_baseline:
        out = subprocess.run([sys.executable, SHARED_BASELINE, str(args.threads)], capture_output=True,
                             text=True, check=True)
        shared = json.loads(out.stdout.strip().splitlines()[-1])["generate_new_tokens_per_s"]
        result["shared_baseline_new_tokens_per_s"] = shared
        result["ratio_vs_shared_baseline"] = result["icegrt_jax_new_tokens_per_s"] / shared
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
