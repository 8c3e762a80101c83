"""SFT training-step throughput: icegrt-jax vs transformers + torch AdamW, and XLA's matmul peak.

Config bench-small (vocab 8000, hidden 256, mlp 688, 4 layers, 8 heads, 4 kv heads, untied),
batch 16 x 256 tokens, every token in the loss, AdamW; the torch side is
../shared/bench/torch_sft_generate_baseline.py run in a subprocess in the same session.
Achieved FLOP/s use the baseline's own count, 6 * params * tokens, on both sides.
Usage: python scripts/bench_sft.py [--threads 2] [--reps 5] [--remat none] [--skip-torch]
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


def matmul_peak_gflops(n=2048, reps=5):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best / 1e9


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
    args = parser.parse_args()
    cfg = preset("bench-small", remat=args.remat)
    _, params = nnx.split(Llama(cfg, nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    opt_cfg = OptimizerConfig(lr=1e-4, max_grad_norm=None, schedule="constant")
    tx = make_optimizer(opt_cfg, 100)
    graphdef, _ = abstract_model(cfg)
    step = make_train_step(graphdef, tx, learning_rate_schedule(opt_cfg, 100), accum_steps=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "attention_mask": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.ones((B, T), jnp.int32)}
    state = init_train_state(params, tx, 0)
    for _ in range(2):
        state, _metrics = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        state, _ = step(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    step_s = min(times)
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
