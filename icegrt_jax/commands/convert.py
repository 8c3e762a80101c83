"""``icegrt convert SRC OUT``: HF safetensors directory <-> project (Orbax) checkpoint, for policies
(LlamaForCausalLM) and reward models / critics (LlamaForSequenceClassification)."""

from __future__ import annotations


def register(subparsers):
    parser = subparsers.add_parser("convert", help="HF safetensors <-> project (Orbax) checkpoint")
    parser.add_argument("src", help="an HF LLaMA directory or a project checkpoint directory")
    parser.add_argument("out", help="output directory (written atomically)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="parameter dtype to store")
    parser.add_argument("--tokenizer", help="directory whose tokenizer files to copy (default: src's)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="HF shard size limit")
    parser.set_defaults(func=run)


def run(args) -> int:
    """The direction is auto-detected: a project checkpoint goes to HF, anything else comes from HF."""
    import os
    import sys

    import jax

    from icegrt_jax import checkpoint, files, hf
    from icegrt_jax.errors import UserInputError

    out, src = os.path.realpath(args.out), os.path.realpath(args.src)
    if os.path.commonpath([out, src]) == out:
        raise UserInputError(f"{args.out}: OUT is or contains SRC; writing it would replace the model being converted")
    if os.path.dirname(src) == os.path.dirname(out) and os.path.basename(src).startswith(
            tuple(f"{os.path.basename(out)}.{kind}-" for kind in ("old", "tmp"))):
        raise UserInputError(f"{args.src}: SRC is a copy an interrupted write of OUT left, which writing OUT "
                             "recovers or removes; move it elsewhere first")
    if not 0 < args.max_shard_gb < float("inf"):
        raise UserInputError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    hf.check_replaceable(args.out)  # before loading SRC: a refused OUT or tokenizer fails at once
    files.check_writable(args.out)
    if args.tokenizer:
        hf.tokenizer_files(args.tokenizer, required=True)
    overrides = {"param_dtype": args.dtype} if args.dtype else {}
    tokenizer = args.tokenizer or (args.src if hf.tokenizer_files(args.src) else None)
    model_kind = hf.read_config_kind(args.src)  # a missing directory or config.json, a run directory: one line
    if checkpoint.is_project_checkpoint(args.src):  # generation_config.json's sampling defaults are kept both ways
        cfg, params = checkpoint.load_model(args.src, **overrides)
        hf.save_hf(cfg, params, args.out, tokenizer=tokenizer, progress=True, max_shard_size=int(args.max_shard_gb * 1024**3),
                   kind=model_kind, generation=hf.read_generation_config(args.src))
        kind = "HF"
    else:
        cfg, params = hf.load_hf(args.src, progress=True, **overrides)
        checkpoint.save_model(cfg, params, args.out, tokenizer=tokenizer, kind=model_kind,
                              extra_json=hf.carried_generation_config(args.src, cfg))
        kind = "project"
    print(f"wrote {kind} checkpoint {args.out} ({hf.HF_ARCHITECTURES[model_kind]}, {sum(x.size for x in jax.tree.leaves(params)):,} "
          f"parameters, {cfg.param_dtype})")
    if tokenizer is None:
        print(f"note: {args.src} has no tokenizer files and no --tokenizer was given: {args.out} has none "
              "(generate, eval and the trainers need one)", file=sys.stderr)
    return 0
