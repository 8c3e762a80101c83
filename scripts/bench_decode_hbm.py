"""Decode throughput on a GPU against the HBM-bandwidth bound (issue 4's GPU measure).

Model: ``--preset`` (default llama-1b, TinyLlama-1.1B's shape) with random bf16 weights and a bf16
KV cache; ``--prompt`` random prompt tokens (default 128) and greedy decoding of ``--new`` tokens
(default 256, no EOS stop) for each ``--batches`` size (default 1, 16, 64).

Decode step time: ours compiles one program for ``--new`` and ``--new // 2 + 1`` new tokens (one
new-token bucket), so step = (t(new) - t(new // 2 + 1)) / (new - new // 2 - 1) leaves out prefill
and the call overhead.

Bytes a step must read from HBM: every weight once except the embedding table (B rows of it), in
bf16, plus the filled part of the KV cache (2 x L x B x filled x K x D x 2 bytes, filled = prompt
+ new / 2 on average). Our decode attends over all P + N cache slots (masked), so it reads the whole
cache; both figures are printed. Ours decodes from a per-layer bf16 copy of the weights
(``sampling`` makes it once per call). Bound = bytes / bandwidth, the bandwidth measured here by a
``y = x + 1`` pass over a 4 GiB fp32 array (bytes read + written). ``fraction_of_hbm_bound`` =
bound / measured step time: 1.0 would be decoding at the memory roofline.

``--torch`` instead times transformers' ``generate`` (bf16, CUDA, default attention) at the same
shape for the given batch sizes, with its own random weights (speed does not depend on them).

    python scripts/bench_decode_hbm.py [--preset llama-1b] [--batches 1,16,64] [--torch]

Prints one JSON object per batch size, then a summary.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np
from bench_timing import best_time


def copy_bandwidth_gb_s(gib: int = 4) -> float:
    """Measured HBM bandwidth: bytes read + written by ``x + 1`` over ``gib`` GiB of fp32."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((gib * 2**28,), jnp.float32)
    add = jax.jit(lambda a: a + 1)
    seconds = best_time(lambda: add(x).block_until_ready(), 5)
    return 2 * x.nbytes / seconds / 1e9


def decode_bytes(cfg, batch: int, filled: float) -> float:
    """HBM bytes of one decode step: weights (bf16, embedding table excepted) + ``filled`` cache slots."""
    weights = (cfg.num_params() - cfg.vocab_size * cfg.hidden_size) * 2
    if cfg.tie_word_embeddings:  # the table is the LM head too: read in full
        weights += cfg.vocab_size * cfg.hidden_size * 2
    cache = 2 * cfg.num_layers * batch * filled * cfg.num_kv_heads * cfg.head_dim * 2
    return weights + cache


def time_ours(args) -> list[dict]:
    import jax
    from flax import nnx

    from icegrt_jax.models.llama import Llama, preset
    from icegrt_jax.sampling import SamplingParams, generate

    cfg = preset(args.preset, dtype="bfloat16", param_dtype="bfloat16")
    model = nnx.split(Llama(cfg, nnx.Rngs(0)))
    bandwidth = copy_bandwidth_gb_s()
    rows = []
    for batch in args.batches:
        prompts = list(np.random.default_rng(batch).integers(1, cfg.vocab_size, (batch, args.prompt)).astype(np.int32))

        def run(new, prompts=prompts):
            params = SamplingParams(greedy=True, max_new_tokens=new, eos_token_ids=())
            return generate(model, prompts, params).tokens

        half = args.new // 2 + 1
        full, short = (best_time(functools.partial(run, new), args.repeats) for new in (args.new, half))
        step = (full - short) / (args.new - half)
        slots = args.prompt + args.new  # both are powers of two here: the bucketed cache size
        needed = decode_bytes(cfg, batch, args.prompt + args.new / 2)
        read = decode_bytes(cfg, batch, slots)
        rows.append({
            "device": jax.devices()[0].device_kind, "preset": args.preset, "batch": batch,
            "prompt": args.prompt, "new": args.new, "seconds": full,
            "new_tokens_per_s": batch * args.new / full, "decode_step_ms": 1e3 * step,
            "decode_tokens_per_s": batch / step, "hbm_gb_per_s_measured": bandwidth,
            "bytes_needed_per_step_mb": needed / 1e6, "bytes_read_by_ours_per_step_mb": read / 1e6,
            "hbm_bound_step_ms": 1e3 * needed / (bandwidth * 1e9),
            "fraction_of_hbm_bound": needed / (bandwidth * 1e9) / step,
            "achieved_gb_per_s_of_ours_reads": read / step / 1e9,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def time_torch(args) -> list[dict]:
    import torch
    import transformers

    from icegrt_jax.models.llama import preset

    cfg = preset(args.preset)
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run only
    model = transformers.LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    rows = []
    for batch in args.batches:
        prompt = torch.from_numpy(np.random.default_rng(batch).integers(1, cfg.vocab_size, (batch, args.prompt))).to(device)

        def run(prompt=prompt):
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                                     min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        seconds = best_time(run, max(1, args.repeats - 1))
        rows.append({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "side": "transformers", "version": transformers.__version__,
                     "batch": batch, "seconds": seconds, "new_tokens_per_s": batch * args.new / seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--batches", default="1,16,64", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch", action="store_true", help="time transformers generate instead")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = time_torch(args) if args.torch else time_ours(args)
    print(json.dumps({"summary": rows, "wall_s": time.perf_counter() - start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
