"""``icegrt eval --model DIR [--model DIR ...] --tasks NAMES [--data-dir DIR] [--output DIR]``.

Runs the paper's benchmark settings (configs/eval/, see docs/eval.md) through lm-evaluation-harness
with our JAX backend, on hub data or on local JSONL files (``--data-dir``). Writes to ``--output``:

- ``results.md``: per model, every metric of each benchmark; with several models, a side-by-side
  table of the headline metrics in the shape of the paper's Table 1 (models as rows);
- ``results.json``: the same numbers, machine-readable, with the number of requests per request type
  whose context was left-truncated to fit the context length (also named in results.md) and the
  ``--limit`` (documents per task; null when all ran);
- ``<model>/lm_eval_results.json``: lm-eval's full results; ``<model>/local_tasks/``: the task
  YAMLs generated for ``--data-dir``; ``<model>/eval_settings.json``: what produced them.

A rerun into the same ``--output`` reuses a model's results when its settings (tasks, data,
``--limit``, the backend's options) and its files (names, sizes, modification times) are
unchanged, so a failed or stopped run of several models resumes at the first unfinished one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from icegrt_jax import files
from icegrt_jax.errors import UserInputError

RESULT_INFO_KEYS = ("alias", "name", "sample_len", "sample_count")
SETTINGS_FILE = "eval_settings.json"  # per model, written after its results: what produced them


def register(subparsers):
    parser = subparsers.add_parser("eval", help="the paper's benchmarks through lm-evaluation-harness")
    parser.add_argument("--model", action="append", required=True,
                        help="model directory (HF or project checkpoint); repeat to compare models")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated: mmlu, agieval_en, bbh, agieval_zh, arc_e, arc_c, hellaswag, "
                             "winogrande, race_m, race_h, gsm8k, math, nq, webqs, lambada, table1, ablation")
    parser.add_argument("--data-dir", help="local JSONL data, DIR/<dataset>/<config>/<split>.jsonl "
                                           "(default: download from the HF hub)")
    parser.add_argument("--output", default="eval_results", help="output directory (default: eval_results)")
    parser.add_argument("--batch-size", type=int, default=16, help="requests or prompts per batch")
    parser.add_argument("--limit", type=int, help="evaluate only the first N documents of each task (smoke tests)")
    parser.add_argument("--max-length", type=int, help="context length (default: the model's)")
    parser.add_argument("--max-gen-toks", type=int, help="new-token limit of tasks that set none (default 256)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="parameter/compute dtype")
    parser.add_argument("--config-dir", help="directory of the benchmark configs (default: the packaged icegrt_jax/configs/eval; configs/eval in a "
                        "checkout)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from icegrt_jax.eval import require_lm_eval

    require_lm_eval()
    from icegrt_jax.eval.tasks import (
        CONFIG_DIR,
        check_local_data,
        load_benchmarks,
        resolve_names,
    )
    from icegrt_jax.hf import load_hf_config, read_config_kind, tokenizer_files

    config_dir = args.config_dir or CONFIG_DIR
    benchmarks = load_benchmarks(config_dir)
    requested = [n for n in args.tasks.split(",") if n.strip()]
    if not requested:
        raise UserInputError(f"--tasks {args.tasks!r}: no task names given (e.g. --tasks arc_e,gsm8k or table1)")
    names = resolve_names(requested, benchmarks)
    out = Path(args.output)
    files.check_writable(out / "results.json")  # an unwritable --output fails now, not after the first model
    for path in args.model:
        if not os.path.isdir(path):
            raise UserInputError(f"{path}: no such model directory")
        # a bad model fails now, not after the models before it have run
        if read_config_kind(path) != "causal_lm":  # a run directory: names its final model
            raise UserInputError(f"{path}: a reward model or critic (LlamaForSequenceClassification); eval needs a "
                                 "causal LM")
        load_hf_config(path)
        tokenizer_files(path, required=True)
    for flag in ("batch_size", "limit", "max_length", "max_gen_toks"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserInputError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.data_dir is not None:  # every data file is there before the first model loads
        check_local_data(names, benchmarks, args.data_dir, config_dir)
    created = files.outermost_missing(out)
    files.make_directory(out, "--output directory")
    try:
        report = evaluate(args, names, benchmarks, config_dir, out)
    except Exception:
        finished = any((out / label / "lm_eval_results.json").exists() for label in model_labels(args.model))
        if created and not finished:  # a run that failed before any result leaves no directory it made
            files.remove_made_directories(out, created)
        raise
    text = render_report(report)
    files.write_json(out / "results.json", report)
    files.write_text(out / "results.md", text)
    print(text, end="")
    return 0


def evaluate(args, names: list[str], benchmarks: dict, config_dir, out: Path) -> dict:
    """Run the benchmarks on each model (lm-eval's results in ``out/<label>/``); the report."""
    from lm_eval.utils import handle_non_serializable

    from icegrt_jax.eval.lm_eval_backend import IceGRTLM
    from icegrt_jax.eval.tasks import check_hub_data, run_benchmarks

    labels = model_labels(args.model)
    all_results, truncated, hub_checked = {}, {}, args.data_dir is not None
    for label, path in zip(labels, args.model):
        model_args = {k: v for k, v in {"pretrained": path, "batch_size": args.batch_size, "max_length": args.max_length,
                                        "max_gen_toks": args.max_gen_toks, "dtype": args.dtype}.items() if v is not None}
        settings = eval_settings(path, names, model_args, args, config_dir)
        earlier = finished_results(out / label, settings)
        if earlier is not None:
            print(f"{label}: results of an earlier run with the same settings reused ({out / label})", file=sys.stderr)
            all_results[label], truncated[label] = earlier
            continue
        if not hub_checked:  # the hub's data is there before the first model loads (then read from the HF cache)
            check_hub_data(names, benchmarks, config_dir)
            hub_checked = True
        lm = IceGRTLM(**model_args)
        results = run_benchmarks(lm, names, model_args, data_dir=args.data_dir, work_dir=out / label,
                                 limit=args.limit, config_dir=config_dir)  # model_args: recorded in the results
        files.make_directory(out / label, "directory of a model's results")
        files.write_json(out / label / "lm_eval_results.json", results, default=handle_non_serializable)
        files.write_json(out / label / SETTINGS_FILE, {**settings, "truncated": dict(lm.truncated)})  # written last
        all_results[label], truncated[label] = results, dict(lm.truncated)
        if lm.truncated:
            print(f"{label}: {truncation_note(lm.truncated)}", file=sys.stderr)
    return build_report(all_results, dict(zip(labels, args.model)), names, benchmarks, truncated, args.limit)


def eval_settings(path: str, names: list[str], model_args: dict, args, config_dir) -> dict:
    """What a model's results depend on, as JSON: the model's files (relative path, size, mtime),
    the benchmarks, the data, ``--limit`` and the backend's options."""
    model_files = []
    for directory, _, file_names in os.walk(path):
        for file_name in file_names:
            file = os.path.join(directory, file_name)
            stat = os.stat(file)
            model_files.append([os.path.relpath(file, path), stat.st_size, stat.st_mtime_ns])
    model_files.sort()
    return {"model": os.path.abspath(path), "model_files": model_files, "tasks": names, "limit": args.limit,
            "data_dir": None if args.data_dir is None else os.path.abspath(args.data_dir),
            "config_dir": os.path.abspath(config_dir), "model_args": {k: v for k, v in model_args.items() if k != "pretrained"}}


def finished_results(directory: Path, settings: dict) -> tuple[dict, dict[str, int]] | None:
    """(lm-eval's results, the truncation counts) of an earlier run with the same ``settings``;
    None when there is none or anything differs or cannot be read."""
    try:
        earlier = files.read_json(directory / SETTINGS_FILE)
        results = files.read_json(directory / "lm_eval_results.json")
    except UserInputError:
        return None
    truncated = earlier.pop("truncated", None) if isinstance(earlier, dict) else None
    if earlier != settings or not isinstance(truncated, dict) or not isinstance(results, dict):
        return None
    return results, truncated


def model_labels(paths: list[str]) -> list[str]:
    """Directory names, made unique with a ``-N`` suffix (they also name output sub-directories)."""
    labels: list[str] = []
    for path in paths:
        name = os.path.basename(os.path.normpath(os.path.abspath(path)))
        labels.append(name if name not in labels else f"{name}-{len(labels) + 1}")
    return labels


def metric_values(entry: dict) -> dict[str, tuple[float, float | None]]:
    """``metric,filter`` -> (value, stderr or None) of one lm-eval results entry."""
    values = {}
    for key, value in entry.items():
        if key in RESULT_INFO_KEYS or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        stderr = entry.get(f"{metric}_stderr,{filt}")
        values[key] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return values


def truncation_note(truncated: dict[str, int]) -> str:
    """One line naming how many requests of each type had their context left-truncated."""
    counts = ", ".join(f"{n} {request_type}" for request_type, n in sorted(truncated.items()))
    return f"requests whose context was left-truncated to fit the context length: {counts}"


def build_report(all_results: dict[str, dict], paths: dict[str, str], names: list[str], benchmarks: dict,
                 truncated: dict[str, dict[str, int]], limit: int | None = None) -> dict:
    """JSON-ready report: the benchmarks (column, headline metric), ``limit`` (documents per task
    when not all of them ran) and, per model, all metrics, the headline scores (None when lm-eval
    reported no such metric) and the left-truncated request counts."""
    models = {}
    for label, results in all_results.items():
        metrics = {name: metric_values(results["results"].get(name, {})) for name in names}
        models[label] = {
            "path": paths[label],
            "scores": {name: metrics[name].get(benchmarks[name].metric, (None,))[0] for name in names},
            "metrics": {name: {k: {"value": v, "stderr": s} for k, (v, s) in m.items()} for name, m in metrics.items()},
            "n_shot": {task: int(n) for task, n in results.get("n-shot", {}).items()},
            "truncated_requests": truncated[label],
        }
    return {
        "benchmarks": {name: {"column": benchmarks[name].column, "metric": benchmarks[name].metric,
                              "scoring": benchmarks[name].scoring} for name in names},
        "limit": limit,
        "models": models,
    }


def render_report(report: dict) -> str:
    """Markdown: each model's metrics, then (several models) the Table 1-shaped comparison."""
    from icegrt_jax.eval import markdown_table

    benchmarks = report["benchmarks"]
    sections = []
    if report.get("limit"):
        sections.append(f"Only the first {report['limit']} documents of each task (--limit): not comparable "
                        "with full-benchmark scores.")
    for label, model in report["models"].items():
        rows = [[benchmarks[name]["column"] or name, key, f"{m['value']:.4f}",
                 "" if m["stderr"] is None else f"{m['stderr']:.4f}"]
                for name, metrics in model["metrics"].items() for key, m in metrics.items()]
        note = f"\n\nNote: {truncation_note(model['truncated_requests'])}." if model["truncated_requests"] else ""
        sections.append(f"## {label}\n\n" + markdown_table(["Benchmark", "Metric", "Value", "Stderr"], rows) + note)
    if len(report["models"]) > 1:
        rows = [[label] + ["n/a" if model["scores"][name] is None else f"{100 * model['scores'][name]:.2f}%"
                           for name in benchmarks]
                for label, model in report["models"].items()]
        columns = [b["column"] or name for name, b in benchmarks.items()]
        sections.append("## Comparison (headline metric of each benchmark)\n\n"
                        + markdown_table(["Model"] + columns, rows))
    return "\n\n".join(sections) + "\n"
