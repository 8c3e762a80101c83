"""``icegrt rubric --annotations FILE [FILE ...] [--output DIR]``: the Table 2 rubric, scored per model."""

from __future__ import annotations

import os

from icegrt_jax import files


def register(subparsers):
    parser = subparsers.add_parser(
        "rubric", help="score human annotations with the paper's 8-criterion rubric (Tables 2 and 3)")
    parser.add_argument("--annotations", nargs="+", required=True,
                        help="JSONL files, one line per (response, labeler); schema in docs/eval.md")
    parser.add_argument("--output", help="directory for rubric.md and rubric.json (default: print only)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from icegrt_jax.eval.rubric import load_annotations, render_markdown, rubric_report

    report = rubric_report(load_annotations(args.annotations))
    text = render_markdown(report)
    print(text, end="")
    if args.output:
        files.make_directory(args.output, "--output directory")
        files.write_text(os.path.join(args.output, "rubric.md"), text)
        files.write_json(os.path.join(args.output, "rubric.json"), report)
    return 0
