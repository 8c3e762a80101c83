"""``icegrt reward --config FILE [key.sub=value ...]``: ICE-Reward, the ranking reward model."""

from __future__ import annotations


def register(subparsers):
    parser = subparsers.add_parser("reward", help="ICE-Reward reward-model training (resumes automatically)")
    parser.add_argument("--config", help="YAML config (see configs/demo-reward.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.type=bradley_terry")
    parser.set_defaults(func=run)


def run(args) -> int:
    from icegrt_jax.config import RewardConfig, load_config
    from icegrt_jax.train.reward import run_reward

    metrics = run_reward(load_config(RewardConfig, args.config, args.overrides, section="reward"))
    accuracy = metrics.get("final/accuracy")
    print(f"[reward] done: loss {metrics.get('loss', float('nan')):.4f}"
          + (f", accuracy {accuracy:.3f}" if accuracy is not None else ""))
    return 0
