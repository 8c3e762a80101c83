"""``icegrt sft --config FILE [key.sub=value ...]``: ICE-Instruct supervised fine-tuning."""

from __future__ import annotations


def register(subparsers):
    parser = subparsers.add_parser("sft", help="ICE-Instruct supervised fine-tuning (resumes automatically)")
    parser.add_argument("--config", help="YAML config (see configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-5")
    parser.set_defaults(func=run)


def run(args) -> int:
    from icegrt_jax.config import SFTConfig, load_config
    from icegrt_jax.train.sft import run_sft

    metrics = run_sft(load_config(SFTConfig, args.config, args.overrides, section="sft"))
    print(f"[sft] done: loss {metrics.get('loss', float('nan')):.4f}")
    return 0
