"""``icegrt demo``: the main job on the embedded tiny default, one stage after another.

Stages that exist so far: a tiny LLaMA initialised from the embedded ``tiny`` preset is exported
to HF safetensors, imported back, converted to a project checkpoint and back to HF, and checked
to be bitwise identical at every hop. Each stage writes into ``--out`` and is skipped on rerun
when its output is already complete.
"""

from __future__ import annotations

import os


def register(subparsers):
    parser = subparsers.add_parser("demo", help="run the pipeline on the embedded tiny default")
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from icegrt_jax import checkpoint, hf
    from icegrt_jax.models.llama import Llama, preset

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "base-hf")
    if not os.path.exists(os.path.join(base, "config.json")):
        cfg = preset("tiny")
        _, params = nnx.split(Llama(cfg, nnx.Rngs(args.seed)))
        hf.save_hf(cfg, params, base)
        print(f"[model] initialised tiny LLaMA ({cfg.num_params():,} parameters) -> {base}")
    cfg, params = hf.load_hf(base)
    project = os.path.join(args.out, "base-orbax")
    if not checkpoint.is_project_checkpoint(project):
        checkpoint.save_model(cfg, params, project)
    exported = os.path.join(args.out, "export-hf")
    if not os.path.exists(os.path.join(exported, "config.json")):
        hf.save_hf(*checkpoint.load_model(project), exported)
    _, roundtrip = hf.load_hf(exported)
    identical = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(roundtrip)))
    print(f"[convert] HF -> Orbax -> HF round trip bitwise identical: {identical} ({exported})")
    return 0 if identical else 1
