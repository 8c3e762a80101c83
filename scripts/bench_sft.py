"""SFT training-step throughput: icegrt-jax vs transformers + torch AdamW, and XLA's matmul peak.

Default: config bench-small (vocab 8000, hidden 256, mlp 688, 4 layers, 8 heads, 4 kv heads,
untied), batch 16 x 256 tokens, every token in the loss, AdamW; the torch side is
../shared/bench/torch_sft_generate_baseline.py run in a subprocess in the same session.
Achieved FLOP/s use the baseline's own count, 6 * params * tokens, on both sides.

``--mfu`` (for a GPU; issue 8's measure): the model-FLOPs utilisation of one SFT step of
``--preset`` (default llama-1b) at ``--batch`` x ``--seq`` (default 8 x 2048) in ``--dtype``
(default bfloat16 compute, fp32 params and AdamW state), against the measured peak of an 8192^3
matmul in that dtype. Model FLOPs per step = 6 * N * tokens + 12 * L * H * T * tokens (N: every
parameter but the embedding table; the second term is attention's QK^T and PV, forward and
backward, counted over the full T x T as in PaLM's MFU). No torch side.

Usage: python scripts/bench_sft.py [--threads 2] [--reps 5] [--remat none] [--skip-torch]
       python scripts/bench_sft.py --mfu [--preset llama-1b] [--batch 8] [--seq 2048] [--remat none]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from icegrt_jax.config import OptimizerConfig
from icegrt_jax.hf import abstract_model
from icegrt_jax.models.llama import Llama, preset
from icegrt_jax.train.sft import make_train_step
from icegrt_jax.train.state import (
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
)

B, T = 16, 256
BASELINE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "torch_sft_generate_baseline.py")


def matmul_peak_gflops(n=2048, reps=5, dtype=jnp.float32):
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def random_batch(cfg, batch: int, length: int) -> dict:
    """Random tokens, every one attended and in the loss."""
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length + 1)).astype(np.int32)
    return {"input_ids": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "attention_mask": jnp.ones((batch, length), jnp.int32), "loss_mask": jnp.ones((batch, length), jnp.int32)}


def fastest_step(step, state, batch, reps: int) -> float:
    """Seconds of the fastest of ``reps`` steps after two warm-up steps (compilation)."""
    for _ in range(2):
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        state, _ = step(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return min(times)


def measure_mfu(args) -> dict:
    """One SFT step of ``args.preset`` on the default device: achieved model FLOP/s over the peak."""
    cfg = preset(args.preset, remat=args.remat, dtype=args.dtype, param_dtype="float32")
    opt_cfg = OptimizerConfig(lr=1e-5, max_grad_norm=1.0, schedule="constant")
    tx = make_optimizer(opt_cfg, 100)
    graphdef, _ = abstract_model(cfg)
    step = make_train_step(graphdef, tx, learning_rate_schedule(opt_cfg, 100), accum_steps=1)
    state = jax.jit(lambda: init_train_state(nnx.split(Llama(cfg, nnx.Rngs(0)))[1], tx, 0))()
    step_s = fastest_step(step, state, random_batch(cfg, args.batch, args.seq), args.reps)
    tokens = args.batch * args.seq
    lookup_only = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # a tied table is the LM head too
    matmul_params = cfg.num_params() - lookup_only
    model_flops = 6 * matmul_params * tokens + 12 * cfg.num_layers * cfg.hidden_size * args.seq * tokens
    peak = matmul_peak_gflops(n=8192, dtype=jnp.dtype(args.dtype)) * 1e9
    return {"device": jax.devices()[0].device_kind, "preset": args.preset, "params": cfg.num_params(),
            "batch": [args.batch, args.seq], "dtype": args.dtype, "remat": args.remat, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "model_tflops_per_s": model_flops / step_s / 1e12,
            "matmul_peak_tflops_per_s": peak / 1e12, "mfu_of_measured_peak": model_flops / step_s / peak}


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--mfu", action="store_true", help="model-FLOPs utilisation of --preset (a GPU)")
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if args.mfu:
        print(json.dumps(measure_mfu(args)))
        return
    cfg = preset("bench-small", remat=args.remat)
    _, params = nnx.split(Llama(cfg, nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    opt_cfg = OptimizerConfig(lr=1e-4, max_grad_norm=None, schedule="constant")
    tx = make_optimizer(opt_cfg, 100)
    graphdef, _ = abstract_model(cfg)
    step = make_train_step(graphdef, tx, learning_rate_schedule(opt_cfg, 100), accum_steps=1)
    step_s = fastest_step(step, init_train_state(params, tx, 0), random_batch(cfg, B, T), args.reps)
    peak = matmul_peak_gflops()
    result = {"params": n_params, "batch": [B, T], "icegrt_step_s": step_s, "icegrt_tokens_per_s": B * T / step_s,
              "icegrt_gflops": 6 * n_params * B * T / step_s / 1e9, "xla_matmul_peak_gflops": peak,
              "icegrt_fraction_of_xla_peak": 6 * n_params * B * T / step_s / 1e9 / peak, "remat": args.remat}
    if not args.skip_torch:
        out = subprocess.run([sys.executable, BASELINE, str(args.threads)], capture_output=True, text=True, check=True)
        torch_result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update({"torch_tokens_per_s": torch_result["sft_tokens_per_s"], "torch_gflops": torch_result["sft_gflops"],
                       "ratio_icegrt_over_torch": result["icegrt_tokens_per_s"] / torch_result["sft_tokens_per_s"],
                       "torch_generate_new_tokens_per_s": torch_result["generate_new_tokens_per_s"]})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
