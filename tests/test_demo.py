"""``icegrt demo``: the generated data, the annotator and labelers, and every stage end to end on
settings smaller than ``--fast`` (the report's structure, resume, the HF export's greedy parity).
The rubric gain is measured by the full run (docs/bench_demo.md), not asserted here."""

import dataclasses
import json
import os
import random

import pytest

from icegrt_jax.cli import main
from icegrt_jax.demo import annotator, data, pipeline
from icegrt_jax.eval.rubric import CRITERION_WEIGHTS


def test_generated_data_is_deterministic_and_holds_out_evaluation_ads():
    cfg = dataclasses.replace(pipeline.DemoConfig(), pretrain_documents=50, sft_ad_examples=60,
                              sft_arithmetic_examples=20, ranking_prompts=10, ppo_prompts=10)
    first, second = pipeline.generate_data(cfg), pipeline.generate_data(cfg)
    assert first == second
    held_out = {r["prompt"] for r in first["eval_ad"]}
    for name in ("sft_train", "sft_eval", "ranking_prompts", "ppo_prompts"):
        assert not held_out & {r["prompt"] for r in first[name]}, name
    general = {r["prompt"] for r in first["eval_general"]}
    assert not general & {r["prompt"] for r in first["sft_train"] + first["sft_eval"]}


def test_annotator_scores_ideal_responses_positive_and_flaws_down():
    case = next(c for c in data.all_ad_cases() if c.policy == "sexual hint")
    prompt = data.ad_prompt(case, 0)
    assert set(annotator.annotate(prompt, data.ideal_response(case)).values()) == {"positive"}
    wrong = annotator.annotate(prompt, data.statement("political content"))
    assert wrong["accuracy"] == "negative" and wrong["completeness"] == "negative"
    curt = annotator.annotate(prompt, data.CURT_ANSWER)
    assert curt["courtesy"] == "negative" and curt["accuracy"] == "negative"
    unsafe = " ".join((data.statement(case.policy), data.reason_sentence(case.policy, case),
                       data.rewrite_sentence(case.policy, case, unsafe=True)))
    labels = annotator.annotate(prompt, unsafe)
    assert labels["safety"] == "negative" and labels["comfortableness"] == "negative"
    verbose = data.ideal_response(case) + " " + " ".join(data.FILLER)
    assert annotator.annotate(prompt, verbose)["conciseness"] == "negative"
    garbled = annotator.annotate(prompt, data.ideal_response(case) + " policy policy the the ad")
    assert garbled["clarity"] == "negative"


def test_demonstrations_are_of_mixed_quality_and_labelers_rank_them():
    rng = random.Random(0)
    cases = data.all_ad_cases()
    labels = []
    for _ in range(400):
        case = rng.choice(cases)
        labels.append(annotator.annotate(data.ad_prompt(case, 1), data.demonstration(rng, case, data.DemoQuality())))
    for criterion in ("accuracy", "completeness", "conciseness", "safety", "courtesy"):
        assert {"positive", "negative"} <= {l[criterion] for l in labels}, criterion
    assert {"positive", "neutral"} <= {l["clarity"] for l in labels}
    rankings = pipeline.rank_responses(data.ad_prompt(cases[0], 0), ["x"] * 2 + [data.ideal_response(cases[0])] * 3,
                                       seed=0, item=0)
    assert len(rankings) == len(annotator.LABELERS)
    assert all(sorted(r) == list(range(5)) and set(r[:3]) == {2, 3, 4} for r in rankings)


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def smallest_run(out: str) -> pipeline.Run:
    """The ``--fast`` configuration shrunk further, so every stage runs in seconds."""
    run = pipeline.load_run(out, fast=True)
    demo = dataclasses.replace(run.demo, pretrain_documents=200, sft_ad_examples=120, sft_arithmetic_examples=40,
                               sft_eval_examples=16, ranking_prompts=24, ppo_prompts=16, eval_ad_prompts=8,
                               held_out_arithmetic=8, max_new_tokens=32, export_check_prompts=2)
    shrink = {"pretrain": "training.steps=4", "sft": "training.steps=6", "reward": "training.steps=3",
              "ppo": "training.steps=2"}

    def small(name, cfg):
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(
            cfg.training, steps=int(shrink[name].split("=")[1]), save_every=100, eval_every=100))
        if name == "pretrain":
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, hidden_size=32, intermediate_size=64, num_layers=1))
        if name == "ppo":
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompts_per_iteration=8),
                                      rollout=dataclasses.replace(cfg.rollout, max_new_tokens=32))
        return cfg

    return dataclasses.replace(run, demo=demo, trainers={k: small(k, v) for k, v in run.trainers.items()})


def test_bad_out_or_config_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "file: exists and is not a directory; choose another --out directory" in capsys.readouterr().err
    assert main(["demo", "--fast", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "d")]) == 2
    assert "nope.yaml: no such config file" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "mine"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "mine")]) == 2
    assert "mine: not empty and not a demo's output (it holds 'notes.txt')" in capsys.readouterr().err
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_every_stage_runs_writes_the_report_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "demo")
    run = smallest_run(out)
    timings = pipeline.run_demo(run)
    assert list(timings) == [name for name, _, _ in pipeline.STAGES]

    report = read_text(os.path.join(out, "report.md"))
    for heading in ("## Summary", "## In-domain rubric", "## Training curves", "## Stage wall times",
                    "Overall Score", "Fleiss' kappa", "General task", "Reward model: held-out pairwise accuracy",
                    "Kendall tau"):
        assert heading in report, heading
    for criterion in CRITERION_WEIGHTS:
        assert criterion.capitalize() in report
    for png in ("ppo_curves.png", "reward_curve.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    results = json.loads(read_text(os.path.join(out, "eval", "results.json")))
    for decoding in ("sampled", "greedy"):
        assert set(results["decoding"][decoding]["scores"]) == {pipeline.ICE_INSTRUCT, pipeline.ICE_GRT}
    check = json.loads(read_text(os.path.join(out, "export", "check.json")))
    assert check["transformers_available"] and check["identical_greedy"] == check["prompts"] == 2
    assert os.path.exists(os.path.join(out, "export", "hf", "model.safetensors"))

    printed = capsys.readouterr().out
    assert "responses hit demo.max_new_tokens (32) before an end token" in printed  # counted
    samples = [json.loads(line) for line in read_text(os.path.join(out, "rlhf", "samples.jsonl")).splitlines()]
    assert all(len(s["truncated"]) == len(s["responses"]) for s in samples)  # and flagged
    flags = [flag for s in samples for flag in s["truncated"]]
    assert sum(flags) and f"\n{sum(flags)} of {len(flags)} responses hit demo.max_new_tokens" in printed
    assert set(os.listdir(out)) <= pipeline.OUTPUTS  # what check_out lets a rerun resume
    pipeline.check_out(out)
    again = pipeline.run_demo(run)
    skipped = capsys.readouterr().out
    assert skipped.count("done, skipped") == len(pipeline.STAGES) and "report:" in skipped
    assert again.keys() == timings.keys()


def test_a_figure_that_fails_to_render_leaves_no_png(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from icegrt_jax.demo.report import save_figure

    fig = plt.figure()

    def half_then_fail(target, **kwargs):
        target.write(b"\x89PNG half")
        raise RuntimeError("renderer crashed")

    fig.savefig = half_then_fail
    with pytest.raises(RuntimeError, match="renderer crashed"):
        save_figure(fig, str(tmp_path / "curve.png"))
    assert list(tmp_path.iterdir()) == []
    save_figure(plt.figure(), str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")


def test_setting_differences_name_each_changed_key():
    recorded = {"demo": {"seed": 0, "vocab_size": 1024}, "sft": {"training": {"steps": 300, "seed": 0}}}
    assert pipeline.setting_differences(recorded, json.loads(json.dumps(recorded))) == []
    current = {"demo": {"seed": 1, "vocab_size": 1024, "new": "x"}, "sft": {"training": {"steps": 30, "seed": 0}}}
    assert pipeline.setting_differences(recorded, current) == [
        "demo.seed: 0 -> 1", "sft.training.steps: 300 -> 30"]  # demo.new: a field of a later version
    assert pipeline.setting_differences([1], {"a": 1}) == ['settings: [1] -> {"a": 1}']


def test_run_settings_do_not_depend_on_how_out_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pipeline.run_settings(pipeline.load_run("d")) == pipeline.run_settings(pipeline.load_run("./d/"))
    settings = pipeline.run_settings(pipeline.load_run(str(tmp_path / "d"), fast=True))
    assert settings["sft"]["training"]["output_dir"] == "runs/demo/sft"


def test_a_rerun_with_other_settings_is_refused_before_any_stage(tmp_path, capsys, monkeypatch):
    """The first run records its settings; a rerun with another --seed or without --fast is one
    line (exit 2) naming the differences, and runs nothing; the same settings resume."""
    from icegrt_jax.demo import report

    ran, reports = [], []
    monkeypatch.setattr(pipeline, "STAGES", (("data", lambda run: ran.append(run.demo.seed), lambda run: bool(ran)),))
    monkeypatch.setattr(report, "write_report", lambda run, timings: reports.append(run.demo.seed))
    out = str(tmp_path / "d")
    assert main(["demo", "--out", out, "--fast", "--seed", "3"]) == 0 and ran == reports == [3]
    recorded = json.loads(read_text(os.path.join(out, pipeline.SETTINGS_FILE)))
    assert recorded["demo"]["seed"] == 3 and recorded["sft"]["training"]["output_dir"] == "runs/demo/sft"
    capsys.readouterr()
    for argv, difference in ((["--fast", "--seed", "4"], "demo.seed: 3 -> 4"), (["--seed", "3"], "demo.")):
        assert main(["demo", "--out", out, *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--out {out}: holds a demo run with other settings (" in err
        assert difference in err and "rerun with its settings or choose a new --out" in err
    assert ran == reports == [3]
    assert main(["demo", "--out", out, "--fast", "--seed", "3"]) == 0 and ran == [3] and reports == [3, 3]  # resumed


def test_the_tokenizer_is_written_synced_then_renamed(tmp_path, monkeypatch):
    from icegrt_jax import files

    out = str(tmp_path / "d")
    run = pipeline.Run(out, pipeline.DemoConfig(vocab_size=300), {})
    for name in ("pretrain", "sft_train"):
        pipeline.write_jsonl(run.path("data", f"{name}.jsonl"), [{"prompt": "Say hi.", "response": "hi there 12"}])
    synced = []
    sync_tree = files.sync_tree
    monkeypatch.setattr(files, "sync_tree", lambda path: (synced.append(os.path.basename(path)), sync_tree(path)))
    pipeline.stage_tokenizer(run)
    assert os.path.isfile(run.path("data", "tokenizer", "tokenizer.json"))
    assert [name.split("-")[0] for name in synced] == ["tokenizer.tmp"]
    assert sorted(os.listdir(run.path("data"))) == ["pretrain.jsonl", "sft_train.jsonl", "tokenizer"]
