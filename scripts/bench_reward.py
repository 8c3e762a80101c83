"""Reward-model throughput on the CPU: training pairs/s and scoring sequences/s.

Config: the ``tiny`` preset (vocab 256, hidden 64, 2 layers) by default, or ``--preset
bench-small``; batch of 16 pairs x 2 responses x 128 tokens, margin ranking loss, AdamW.
Scoring: the jitted ScoreModel forward + last-token read on 64 sequences of 128 tokens.
Best of ``--reps`` timed calls after a warm-up. Prints one JSON line.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from bench_timing import best_time
from flax import nnx

from icegrt_jax.config import OptimizerConfig
from icegrt_jax.hf import abstract_model
from icegrt_jax.models.heads import ScoreModel
from icegrt_jax.models.llama import preset
from icegrt_jax.train.reward import make_train_step, pair_scores
from icegrt_jax.train.state import (
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
)

PAIRS, LENGTH, SCORED = 16, 128, 64


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    cfg = preset(args.preset)
    graphdef, _ = abstract_model(cfg, "score")
    _, params = nnx.split(ScoreModel(cfg, nnx.Rngs(0)))
    opt = OptimizerConfig(lr=1e-4, schedule="constant")
    tx = make_optimizer(opt, 100)
    step = make_train_step(graphdef, tx, learning_rate_schedule(opt, 100), 1, "margin_ranking", 1.0)
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(3, cfg.vocab_size, (PAIRS, 2, LENGTH)), jnp.int32),
             "attention_mask": jnp.ones((PAIRS, 2, LENGTH), jnp.int32), "weight": jnp.ones((PAIRS,), jnp.float32)}
    holder = {"state": init_train_state(params, tx, 0)}

    def train_once():
        holder["state"], _ = step(holder["state"], batch)
        jax.block_until_ready(holder["state"])

    train_s = best_time(train_once, args.reps)
    score = jax.jit(lambda p, b: pair_scores(graphdef, p, b))
    scored = {"input_ids": batch["input_ids"][:1].repeat(SCORED // 2, 0), "attention_mask": batch["attention_mask"][:1].repeat(SCORED // 2, 0)}
    score_s = best_time(lambda: jax.block_until_ready(score(holder["state"].params, scored)), args.reps)
    print(json.dumps({"preset": args.preset, "tokens_per_response": LENGTH, "train_pairs_per_s": PAIRS / train_s,
                      "train_step_s": train_s, "score_sequences_per_s": SCORED / score_s,
                      "params": int(sum(x.size for x in jax.tree.leaves(params)))}))


if __name__ == "__main__":
    main()
