"""``icegrt sft|reward|ppo --config FILE [key.sub=value ...]``: the three trainers.

Each reads its section of a multi-run YAML file (``configs/demo.yaml``) or a whole single-run
file, applies the dotted overrides, and resumes from its newest checkpoint when rerun.
"""

from __future__ import annotations

import importlib

from icegrt_jax.errors import UserInputError

# name -> (help, config class in icegrt_jax.config, "module:function", metrics printed at the end)
TRAINERS = {
    "sft": ("ICE-Instruct supervised fine-tuning", "SFTConfig", "icegrt_jax.train.sft:run_sft", ("loss",)),
    "reward": ("ICE-Reward ranking reward model", "RewardConfig", "icegrt_jax.train.reward:run_reward",
               ("loss", "final/accuracy")),
    "ppo": ("ICE-GRT PPO with actor, critic, reference and reward model", "PPOConfig",
            "icegrt_jax.train.ppo:run_ppo", ("score_raw_mean", "kl")),
}


def register(subparsers):
    for name, (help_text, _, _, _) in TRAINERS.items():
        parser = subparsers.add_parser(name, help=f"{help_text} (resumes automatically)")
        parser.add_argument("--config", help="YAML config (see configs/)")
        parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=100")
        parser.set_defaults(func=run)


def run(args) -> int:
    from icegrt_jax import config
    from icegrt_jax.config_loader import load_config

    if args.config is None and not args.overrides:
        raise UserInputError(f"give a config: --config FILE (configs/) and/or dotted overrides (see icegrt {args.command} --help)")
    _, schema, target, shown = TRAINERS[args.command]
    module, function = target.split(":")
    cfg = load_config(getattr(config, schema), args.config, args.overrides, section=args.command)
    metrics = getattr(importlib.import_module(module), function)(cfg)
    summary = ", ".join(f"{key} {metrics[key]:.4f}" for key in shown if key in metrics)
    print(f"[{args.command}] done: {summary or 'no step left to run (training.steps reached); see metrics.jsonl'}")
    return 0
