"""The demo's report: ``report.md`` (Table 3-shaped rubric, general task, reward model, labeler
agreement, export check, stage times) and PNG plots of PPO and reward-model training."""

from __future__ import annotations

import datetime
import io
import os
import platform

from icegrt_jax import files
from icegrt_jax.demo import pipeline
from icegrt_jax.eval import markdown_table
from icegrt_jax.eval.rubric import render_markdown

PPO_CURVES = (("score_raw_mean", "reward-model score"), ("kl", "KL(actor || reference)"),
              ("response_length", "response length (tokens)"))
EXAMPLES = 3


def read_metrics(path: str) -> list[dict]:
    return pipeline.read_jsonl(path) if os.path.exists(path) else []


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry ``key``."""
    rows = [(m["step"], m[key]) for m in metrics if key in m]
    return [s for s, _ in rows], [v for _, v in rows]


def save_figure(fig, path: str) -> None:
    """``fig`` as a PNG at ``path``, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    files.write_bytes(path, buffer.getvalue())


def plot_ppo(metrics: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PPO_CURVES), figsize=(4 * len(PPO_CURVES), 3.2))
    for ax, (key, title) in zip(axes, PPO_CURVES):
        ax.plot(*series(metrics, key), marker=".")
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
    fig.tight_layout()
    save_figure(fig, path)


def plot_reward(metrics: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(8, 3.2))
    loss_ax.plot(*series(metrics, "loss"), label="train")
    loss_ax.set_title("margin ranking loss")
    acc_ax.plot(*series(metrics, "accuracy"), label="train batch")
    acc_ax.plot(*series(metrics, "eval/accuracy"), marker="o", label="held-out")
    acc_ax.set_title("pairwise accuracy")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, path)


def overall(results: dict, decoding: str, model: str) -> float:
    return results["decoding"][decoding]["scores"][model]["overall"]


def summary_lines(run: pipeline.Run, results: dict, reward_stats: dict, agreement: dict, export: dict) -> list[str]:
    grt, instruct = pipeline.ICE_GRT, pipeline.ICE_INSTRUCT
    general = results["general_accuracy"]
    exported = (f"{export['identical_greedy']}/{export['prompts']} held-out prompts give identical greedy text"
                if export["transformers_available"] else "not checked (torch is not installed)")
    return [
        (f"- Rubric, overall (sampled, T={run.demo.temperature}): {instruct} {overall(results, 'sampled', instruct):.1f}% -> "
        f"{grt} {overall(results, 'sampled', grt):.1f}% "
        f"({overall(results, 'sampled', grt) - overall(results, 'sampled', instruct):+.1f} points)"),
        (f"- Rubric, overall (greedy): {instruct} {overall(results, 'greedy', instruct):.1f}% -> "
        f"{grt} {overall(results, 'greedy', grt):.1f}% "
        f"({overall(results, 'greedy', grt) - overall(results, 'greedy', instruct):+.1f} points)"),
        (f"- General task (held-out one-digit sums, greedy, {results['general_prompts']} prompts): {instruct} "
        f"{general[instruct]:.1f}% -> {grt} {general[grt]:.1f}% ({general[grt] - general[instruct]:+.1f} points)"),
        (f"- Reward model: held-out pairwise accuracy {100 * reward_stats['accuracy']:.1f}% "
        f"({reward_stats['split']} pairs)"),
        (f"- Labelers ({len(agreement['labelers'])} per prompt, {agreement['rankings']} rankings of "
        f"{run.demo.samples_per_prompt} responses): mean Kendall tau {agreement['mean_kendall_tau']:.3f}, "
        f"mean Kendall W {agreement['mean_kendall_w']:.3f}, "
        f"{agreement['distinct_responses_per_prompt']:.2f} distinct responses per prompt"),
        f"- Export: {export['hf_dir']}; transformers vs our sampler: {exported}",
    ]


def examples_section(run: pipeline.Run) -> list[str]:
    rows = [r for r in pipeline.read_jsonl(run.path("eval", "responses.jsonl")) if r["decoding"] == "sampled"]
    by_prompt: dict[str, dict[str, str]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], {})[r["model"]] = r["response"]
    lines = []
    for prompt, responses in list(by_prompt.items())[:EXAMPLES]:
        lines += [f"**{prompt}**", ""] + [f"- {model}: {text}" for model, text in responses.items()] + [""]
    return lines


def write_report(run: pipeline.Run, timings: dict[str, float]) -> str:
    """Write ``report.md`` and the plots into the output directory; returns the report's path."""
    results = pipeline.read_json(run.path("eval", "results.json"))
    reward_stats = pipeline.read_json(run.path("reward", "final", "reward_stats.json"))
    agreement = pipeline.read_json(run.path("rlhf", "agreement.json"))
    export = pipeline.read_json(run.path("export", "check.json"))
    plot_ppo(read_metrics(run.path("ppo", "metrics.jsonl")), run.path("ppo_curves.png"))
    plot_reward(read_metrics(run.path("reward", "metrics.jsonl")), run.path("reward_curve.png"))
    lines = [
        "# ICE-GRT demo report", "",
        (f"Seed {run.demo.seed}; {datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"{platform.machine()}, {os.cpu_count()} CPU cores; outputs in `{run.out}`."), "",
        "## Summary", "", *summary_lines(run, results, reward_stats, agreement, export), "",
        f"## In-domain rubric (Table 2 criteria, Table 3 layout): {results['ad_prompts']} held-out ad prompts", "",
        (f"One response per prompt sampled at temperature {run.demo.temperature}, scored by the programmatic "
        "annotator through 3 simulated labelers (docs/demo.md)."), "",
        render_markdown(results["decoding"]["sampled"]), "",
        "Greedy decoding:", "", render_markdown(results["decoding"]["greedy"]), "",
        "## Training curves", "",
        "![PPO: score, KL, response length](ppo_curves.png)", "", "![reward model](reward_curve.png)", "",
        "## Examples (held-out, sampled)", "", *examples_section(run),
        "## Stage wall times", "",
        markdown_table(["stage", "seconds"], [[name, f"{seconds:.1f}"] for name, seconds in timings.items()]), "",
    ]
    path = run.path("report.md")
    files.write_text(path, "\n".join(lines))
    files.write_json(run.path("report.json"), {"results": results, "reward_stats": reward_stats, "agreement": agreement,
                                               "export": export, "timings": timings, "seed": run.demo.seed})
    return path
