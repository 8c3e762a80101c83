"""PPO iteration time: icegrt-jax vs TRL 1.12.0 and Google Tunix 0.1.7, same shape, same machine.

Shape (the baselines' in ../shared/bench/): bench-small models (vocab 8000, hidden 256, mlp 688,
4 layers, 8 heads, 4 kv heads) for actor, reference, critic and reward model, all random; 16
prompts of 16 tokens (BOS + 15 words, the "raw" template) an iteration; exactly 64 sampled
tokens (no stop token); 1 epoch x 1 minibatch; separate critic with its own optimizer; k1 KL
0.05; gamma = lambda = 0.95; whitened advantages. Ours runs twice: ``icegrt`` recomputes the old
log-probs (1 generation, 4 no-grad forwards: old and reference log-probs, values, reward; 2
updates), like Tunix; ``icegrt_sampler_logprobs`` takes them from the sampler
(rollout.old_logprobs=sampler: 3 forwards), like TRL, which also updates policy and value in one
backward.

Usage: python scripts/bench_ppo.py [--iters 5] [--warmup 1] [--trl-python P] [--tunix-python P] [--override K=V]
[--baselines-hugepages] (the baselines run only when their interpreter is given). Ours runs as
``icegrt`` does, with malloc on transparent huge pages (``icegrt_jax.runtime``); the baselines run
without that glibc tunable unless ``--baselines-hugepages``. Prints JSON lines, the summary last.
"""

import argparse
import json
import os
import random
import subprocess
import tempfile

import numpy as np

from icegrt_jax.runtime import REEXEC_MARKER, TUNABLE, reexec_with_malloc_hugepages

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench")
VOCAB, PROMPT_WORDS, PROMPTS = 8000, 15, 64


def build_tokenizer(path: str, seed: int = 0) -> list[str]:
    """A WordLevel tokenizer over 8000 synthetic two-syllable words (as the TRL baseline's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = sorted({a + b for a in syllables for b in syllables})
    rng.shuffle(words)
    words = words[:VOCAB - 4]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(words[i:i + 16]) for i in range(0, len(words), 16)],
                                  trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(path)
    return words


def run_ours(tmp: str, iters: int, warmup: int, old_logprobs: str = "recompute", overrides=()) -> dict:
    from flax import nnx

    from icegrt_jax.checkpoint import save_model
    from icegrt_jax.config import PPOConfig
    from icegrt_jax.config_loader import load_config
    from icegrt_jax.data.tokenize import load_tokenizer
    from icegrt_jax.models.heads import ScoreModel
    from icegrt_jax.models.llama import preset
    from icegrt_jax.train.ppo import run_ppo

    words = build_tokenizer(os.path.join(tmp, "tokenizer"))
    rng = random.Random(1)
    with open(os.path.join(tmp, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(PROMPT_WORDS))}) + "\n" for _ in range(PROMPTS))
    model_cfg = preset("bench-small", vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    _, reward_params = nnx.split(ScoreModel(model_cfg, nnx.Rngs(7)))
    save_model(model_cfg, reward_params, os.path.join(tmp, "reward"), kind="score",
               tokenizer=load_tokenizer(os.path.join(tmp, "tokenizer")))
    cfg = load_config(PPOConfig, None, [
        "model.preset=bench-small", f"model.vocab_size={VOCAB}", f"data.tokenizer_path={tmp}/tokenizer",
        f"data.prompt_files=[{tmp}/prompts.jsonl]", "data.template=raw", "data.prompts_per_iteration=16",
        "rollout.max_new_tokens=64", "rollout.stop_token_ids=[]", f"reward.path={tmp}/reward",
        "ppo.epochs=1", "ppo.minibatches=1", "ppo.kl_coef=0.05", "ppo.gamma=0.95", "ppo.lam=0.95",
        "actor_optimizer.lr=1e-6", "critic_optimizer.lr=1e-6", f"training.steps={warmup + iters}",
        f"rollout.old_logprobs={old_logprobs}",
        "training.save_every=100000", "training.log_every=1", f"training.output_dir={tmp}/run-{old_logprobs}",
        "logging.progress=false", *overrides])
    run_ppo(cfg)
    with open(os.path.join(tmp, f"run-{old_logprobs}", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][warmup:]
    mean = lambda key: float(np.mean([r[key] for r in rows]))
    return {"s_per_iter": mean("step_time_s"), "generate_s": mean("time_generate_s"),
            "score_s": mean("time_score_s"), "update_s": mean("time_update_s"),
            "response_length": mean("response_length")}


def run_baseline(python: str, script: str, iters: int, warmup: int, hugepages: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not hugepages and env.pop(REEXEC_MARKER, None):  # undo what our re-execution added
        kept = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(TUNABLE)]
        env.update({"GLIBC_TUNABLES": ":".join(kept)} if kept else {})
    out = subprocess.run([python, os.path.join(BENCH, script), "--iters", str(iters), "--warmup", str(warmup)],
                         capture_output=True, text=True, check=True, env=env)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "glibc_tunables": env.get("GLIBC_TUNABLES", "")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--trl-python")
    parser.add_argument("--tunix-python")
    parser.add_argument("--override", action="append", default=[], help="extra config override for ours, e.g. "
                        "model.scan_layers=false (repeatable)")
    parser.add_argument("--baselines-hugepages", action="store_true",
                        help="run the baselines with glibc.malloc.hugetlb=1 too (ours always has it where it helps)")
    args = parser.parse_args()
    reexec_with_malloc_hugepages()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
        result["icegrt"] = run_ours(tmp, args.iters, args.warmup, overrides=args.override)
        print(json.dumps(result), flush=True)
        result["icegrt_sampler_logprobs"] = run_ours(tmp, args.iters, args.warmup, "sampler", args.override)
        print(json.dumps(result["icegrt_sampler_logprobs"]), flush=True)
    if args.trl_python:
        result["trl"] = run_baseline(args.trl_python, "trl_ppo_baseline.py", args.iters, args.warmup,
                                     args.baselines_hugepages)
        print(json.dumps(result["trl"]), flush=True)
    if args.tunix_python:
        result["tunix"] = run_baseline(args.tunix_python, "tunix_ppo_baseline.py", args.iters, args.warmup,
                                       args.baselines_hugepages)
        print(json.dumps(result["tunix"]), flush=True)
    for name in ("trl", "tunix"):
        if name in result:
            for ours in ("icegrt", "icegrt_sampler_logprobs"):
                result[f"speedup_{ours}_vs_{name}"] = result[name]["s_per_iteration"] / result[ours]["s_per_iter"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
