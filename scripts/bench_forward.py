"""Forward-pass throughput: icegrt-jax's Llama vs transformers' LlamaForCausalLM, same weights.

Config bench-small (vocab 8000, hidden 256, mlp 688, 4 layers, 8 heads, 4 kv heads), batch
16 x 256 tokens, fp32 logits. Both sides warm up, then the best of ``--reps`` timed runs counts.
Prints JSON. Usage: python scripts/bench_forward.py [--threads 2] [--reps 5]
"""

import argparse
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from bench_timing import best_time
from flax import nnx

from icegrt_jax.hf import abstract_model, load_hf

B, T = 16, 256


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
    torch_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        cfg, params = load_hf(tmp)
    graphdef, _ = abstract_model(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    mask = jnp.ones((B, T), jnp.int32)

    @jax.jit
    def forward(params, tokens, mask):
        return nnx.merge(graphdef, params)(tokens, mask)[0]

    ours = best_time(lambda: forward(params, jnp.asarray(tokens), mask).block_until_ready(), args.reps)
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        theirs = best_time(lambda: torch_model(input_ids=ids).logits, args.reps)
    print(json.dumps({
        "batch": [B, T], "icegrt_tokens_per_s": B * T / ours, "torch_tokens_per_s": B * T / theirs,
        "ratio_icegrt_over_torch": theirs / ours, "jax": jax.__version__, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
