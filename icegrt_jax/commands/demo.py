"""``icegrt demo [--out DIR] [--fast]``: the whole ICE-GRT pipeline on the embedded default.

Generates the data and a tokenizer, pretrains a tiny LLaMA, trains ICE-Instruct, samples and ranks
responses with simulated labelers, trains ICE-Reward and ICE-GRT, evaluates, exports the policy to
HF format and writes ``DIR/report.md``. Rerunning skips finished stages and resumes the rest;
a rerun with other settings than ``DIR/settings.json`` records is refused (docs/demo.md).
"""

from __future__ import annotations


def register(subparsers):
    parser = subparsers.add_parser("demo", help="run the whole pipeline on the embedded tiny default")
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--fast", action="store_true", help="smaller data and shorter training (minutes)")
    parser.add_argument("--config", help="demo config (default: the packaged icegrt_jax/configs/demo.yaml; configs/demo.yaml in a checkout)")
    parser.add_argument("--seed", type=int, help="seed of the data, labelers and trainers (default: the config's)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import os

    import jax

    from icegrt_jax import files
    from icegrt_jax.demo.pipeline import check_out, load_run, run_demo

    run_config = load_run(args.out, args.config, fast=args.fast, seed=args.seed)
    check_out(args.out)
    files.make_directory(args.out, "--out directory")
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # stages (and a resumed run) share programs
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(args.out), "xla-cache"))
    timings = run_demo(run_config)  # a stopped trainer's TrainingStopped exits 128 + its signal (cli.main)
    print(f"[demo] {sum(timings.values()):.0f} s of stages in all")
    return 0
