"""``icegrt ppo --config FILE [key.sub=value ...]``: ICE-GRT, PPO on the reward model."""

from __future__ import annotations


def register(subparsers):
    parser = subparsers.add_parser("ppo", help="ICE-GRT PPO training (resumes automatically)")
    parser.add_argument("--config", help="YAML config (see configs/vicuna-13b-ppo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.kl_coef=0.1")
    parser.set_defaults(func=run)


def run(args) -> int:
    from icegrt_jax.config import PPOConfig, load_config
    from icegrt_jax.train.ppo import run_ppo

    metrics = run_ppo(load_config(PPOConfig, args.config, args.overrides, section="ppo"))
    print(f"[ppo] done: score {metrics.get('score_raw_mean', float('nan')):.4f}, kl {metrics.get('kl', float('nan')):.4f}")
    return 0
