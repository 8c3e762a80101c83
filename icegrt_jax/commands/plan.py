"""``icegrt plan --config PPO.yaml --devices N --device-memory GiB``: per-device memory of a PPO run.

Compiles the run's steps for ``N`` stand-in CPU devices on ``mesh`` without allocating a model
(see ``icegrt_jax.plan``). Runs in its own process: the device count is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import sys

from icegrt_jax.errors import UserInputError

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def register(subparsers):
    parser = subparsers.add_parser("plan", help="per-device memory of a PPO run's roles on a mesh")
    parser.add_argument("--config", required=True, help="a PPO config (YAML); its mesh section is planned")
    parser.add_argument("--section", help="the PPO section of a file that holds several runs (demo.yaml: ppo)")
    parser.add_argument("--devices", type=int, required=True, help="number of accelerators")
    parser.add_argument("--device-memory", type=float, required=True, help="GiB per accelerator")
    parser.add_argument("--reward-preset", help="reward model architecture when reward.path has no config.json")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.fsdp=8")
    parser.set_defaults(func=run)


def use_stand_in_devices(count: int):
    """``count`` CPU devices for compiling; only possible before JAX starts."""
    if count < 1:
        raise UserInputError(f"--devices must be >= 1, got {count}")
    if "jax" in sys.modules:
        import jax

        if jax.device_count() != count:
            raise UserInputError(f"JAX already started with {jax.device_count()} devices; run "
                                 "`icegrt plan` in a process of its own")
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE} "
                               f"--xla_force_host_platform_device_count={count}")


def run(args) -> int:
    if not 0 < args.device_memory < float("inf"):
        raise UserInputError(f"--device-memory must be a positive number of GiB, got {args.device_memory}")
    use_stand_in_devices(args.devices)
    from icegrt_jax.config import PPOConfig
    from icegrt_jax.config_loader import (
        holds_several_runs,
        load_config,
        read_yaml_mapping,
    )

    sections = read_yaml_mapping(args.config)
    if args.section is not None and args.section not in sections and holds_several_runs(PPOConfig, sections):
        raise UserInputError(f"--section {args.section}: {args.config} holds several runs but no such top-level key "
                             f"(it has: {', '.join(map(str, sections))})")
    from icegrt_jax.plan import format_plan, plan_ppo, plan_to_dict

    cfg = load_config(PPOConfig, args.config, args.overrides, section=args.section)
    plan = plan_ppo(cfg, args.device_memory, args.reward_preset, progress=True)
    print(json.dumps(plan_to_dict(plan)) if args.json else format_plan(plan))
    return 0
