"""PPO's held-out evaluation (``data.eval_prompt_files``): greedy responses of the current actor,
scored as the rollouts are, logged as eval/<key> every ``training.eval_every`` iterations and at
the last; the prompts' report; bad eval input."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from ppo_scorers import letter_e_share
from test_ppo import _metrics, _save_reward_model, ppo_setup  # noqa: F401 (a fixture)

from icegrt_jax import cli
from icegrt_jax.checkpoint import load_model
from icegrt_jax.config import PPOConfig
from icegrt_jax.config_loader import load_config
from icegrt_jax.data.templates import get_template
from icegrt_jax.data.tokenize import decode_response, load_tokenizer, tokenize_prompt
from icegrt_jax.hf import abstract_model
from icegrt_jax.sampling import SamplingParams, generate
from icegrt_jax.train import rollout
from icegrt_jax.train.ppo import run_ppo
from icegrt_jax.train.ppo_eval import filled_pieces


def numbered_e_share(prompts, responses):
    """``letter_e_share`` + the number in the prompt (0 if none): the tiny model's greedy responses
    are alike, so this score also tells which prompt a response was scored with (order, fillers)."""
    numbers = [int(m.group()) if (m := re.search(r"\d+", p)) else 0 for p in prompts]
    return [n + e for n, e in zip(numbers, letter_e_share(prompts, responses), strict=True)]


EVAL_KEYS = {"eval/score_raw_mean", "eval/score_raw_std", "eval/response_length", "eval/truncation_rate"}
EVAL_PROMPTS = [f"Tell me {i} things about rivers." for i in range(10)]
TOO_LONG = "Tell me about " + "the sea and the sky " * 20


@pytest.fixture
def eval_setup(ppo_setup):  # noqa: F811 (the imported fixture)
    """``ppo_setup`` with 10 held-out prompts and one too long for data.max_prompt_length=96;
    rollouts of 8 prompts at a time: the evaluation scores a piece of 8 and a filled piece of 2."""
    tmp_path, config = ppo_setup
    with open(tmp_path / "eval.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in [*EVAL_PROMPTS[:4], TOO_LONG, *EVAL_PROMPTS[4:]])
    overrides = [f"data.eval_prompt_files=[{tmp_path / 'eval.jsonl'}]", "data.max_prompt_length=96",
                 "rollout.micro_batch_size=8", "training.steps=3", "training.eval_every=2"]
    return tmp_path, config, overrides


def _model(path, kind="causal_lm"):
    """(graphdef, params) of a saved model."""
    model_cfg, params = load_model(str(path))
    return abstract_model(model_cfg, kind)[0], params


def _greedy(path, cfg, tokenizer):
    """The saved actor's greedy generations of the held-out prompts, and their decoded responses."""
    template = get_template(cfg.data.template)
    result = generate(_model(path), [tokenize_prompt(tokenizer, template, p) for p in EVAL_PROMPTS],
                      SamplingParams(greedy=True, max_new_tokens=cfg.rollout.max_new_tokens,
                                     eos_token_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id),
                      batch_size=8)
    responses = [decode_response(tokenizer, template, result.response_tokens(r), result.finished_by_eos[r])
                 for r in range(len(EVAL_PROMPTS))]
    return result, responses


def _check_eval(row, scores, result):
    assert row["eval/score_raw_mean"] == pytest.approx(float(np.mean(scores)), rel=1e-5, abs=1e-6)
    assert row["eval/score_raw_std"] == pytest.approx(float(np.std(scores)), rel=1e-4, abs=1e-6)
    assert row["eval/response_length"] == pytest.approx(float(result.lengths.mean()))
    assert row["eval/truncation_rate"] == pytest.approx(float(1 - result.finished_by_eos.mean()))


def test_eval_rows_at_eval_every_and_the_last_step_score_the_final_actors_greedy_responses(eval_setup):
    tmp_path, config, overrides = eval_setup
    cfg = load_config(PPOConfig, config, [*overrides, "reward.function=test_ppo_eval:numbered_e_share"])
    run_ppo(cfg)
    out = tmp_path / "run"
    rows = _metrics(out)
    evals = [row for row in rows if any(k.startswith("eval/") for k in row)]
    assert [row["step"] for row in evals] == [2, 3] and all(set(row) == EVAL_KEYS | {"step"} for row in evals)
    assert all(not any(k.startswith("eval/") for k in row) for row in rows if row not in evals)
    documented = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    assert all(f"`{key}`" in documented for key in EVAL_KEYS)
    assert (out / "data_report.txt").read_text().splitlines()[1] == \
        "eval: 10 prompts (1 longer than data.max_prompt_length dropped)"
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    result, responses = _greedy(out / "final", cfg, tokenizer)
    _check_eval(evals[-1], numbered_e_share(EVAL_PROMPTS, responses), result)


def test_eval_with_a_reward_model_scores_as_the_rollouts_do(eval_setup, tiny_tokenizer_dir):
    """The reward model reads the greedy rows as they are (same tokenizer, EOS stops)."""
    tmp_path, config, overrides = eval_setup
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    rm = _save_reward_model(tmp_path / "rm", tokenizer)
    cfg = load_config(PPOConfig, config, [*overrides, "reward.function=null", f"reward.path={rm}",
                                          "reward.normalize=none", "training.steps=1"])
    run_ppo(cfg)
    evals = [row for row in _metrics(tmp_path / "run") if "eval/score_raw_mean" in row]
    assert [row["step"] for row in evals] == [1]
    result, _ = _greedy(tmp_path / "run" / "final", cfg, tokenizer)
    scores = rollout.reward_model_scores(*_model(rm, "score"), result.tokens, result.attention_mask)
    _check_eval(evals[0], np.asarray(scores), result)


def test_without_eval_prompts_there_are_no_eval_rows(ppo_setup):  # noqa: F811
    tmp_path, config = ppo_setup
    run_ppo(load_config(PPOConfig, config, ["training.steps=2", "training.eval_every=1"]))
    assert not [k for row in _metrics(tmp_path / "run") for k in row if k.startswith("eval/")]
    assert len((tmp_path / "run" / "data_report.txt").read_text().splitlines()) == 1


def test_filled_pieces_cover_every_row_once_then_repeat_the_last_pieces_first():
    assert [p.tolist() for p in filled_pieces(10, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 8, 8]]
    assert [p.tolist() for p in filled_pieces(4, 4)] == [[0, 1, 2, 3]]


@pytest.mark.parametrize("eval_file, message", [
    ("/nonexistent/eval.jsonl", "/nonexistent/eval.jsonl"),
    ("{tmp}/long.jsonl", "data.max_prompt_length=96: every prompt of data.eval_prompt_files is longer"),
    ("{tmp}/empty.jsonl", "data.eval_prompt_files {tmp}/empty.jsonl: no prompts (the files are empty)"),
])
def test_bad_eval_prompts_are_one_line_exit_2_nothing_written(ppo_setup, capsys, eval_file, message):  # noqa: F811
    tmp_path, config = ppo_setup
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": TOO_LONG}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    args = [f"data.eval_prompt_files=[{eval_file.format(tmp=tmp_path)}]", "data.max_prompt_length=96"]
    assert cli.main(["ppo", "--config", config, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "run").exists()


def test_two_processes_evaluate_like_one(tmp_path, tiny_tokenizer_dir):
    """Process 0 scores the held-out responses for both (``rollout.primary_scores``), the rows
    split over both processes' devices (3 prompts and a filler): the eval rows equal one process's."""
    from test_multihost import finish, launch, metrics, ppo_config

    runs = {}
    for name, processes in (("multi", 2), ("single", 1)):
        config = ppo_config(tmp_path, tiny_tokenizer_dir, name)
        with open(tmp_path / "eval.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in EVAL_PROMPTS[:3])
        finish(launch(config, steps=1, num_processes=processes, command="ppo",
                      overrides=(f"data.eval_prompt_files=[{tmp_path / 'eval.jsonl'}]",
                                 "reward.function=test_ppo_eval:numbered_e_share")))
        runs[name] = [row for row in metrics(tmp_path / name) if "eval/score_raw_mean" in row]
    assert [row["step"] for row in runs["multi"]] == [1]
    for key in EVAL_KEYS:
        assert runs["multi"][0][key] == pytest.approx(runs["single"][0][key], abs=1e-7), key
