"""ICE-Reward: ranking data -> pairs, learning a preference, exact resume, bad input."""

import json
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import run_cli_killed_at

from icegrt_jax import cli
from icegrt_jax.checkpoint import TrainCheckpointer, load_model
from icegrt_jax.config import RewardConfig
from icegrt_jax.config_loader import load_config
from icegrt_jax.data.preferences import load_preferences
from icegrt_jax.data.sources import DataError
from icegrt_jax.hf import read_config_kind
from icegrt_jax.train.reward import read_reward_stats, run_reward

WORDS = ["fox", "dog", "sea", "waves", "poem", "short", "lazy", "quick", "brown", "capital"]


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def synthetic_preferences(n, seed):
    """Pairs whose preferred response ends with 'Paris.' and the other with 'France.'."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        body = " ".join(rng.choice(WORDS, size=rng.integers(2, 5)))
        prompt = "What is the " + " ".join(rng.choice(WORDS, size=2)) + "?"
        records.append({"prompt": prompt, "chosen": f"{body} Paris.", "rejected": f"{body} France."})
    return records


def ranking_record(prompt="Write a short poem about the sea."):
    return {"prompt": prompt, "responses": ["r0 waves", "r1 sea", "r2 fox", "r3 dog", "r4 lazy"],
            "rankings": [[3, 0, 4, 1, 2], [3, 4, 0, 1, 2], [0, 3, 4, 2, 1]]}


def test_five_way_rankings_give_the_papers_four_pairs(tmp_path):
    write_jsonl(tmp_path / "rank.jsonl", [ranking_record()])
    pairs, report = load_preferences([str(tmp_path / "rank.jsonl")])
    # Borda points: r3 = 4+4+3 = 11, r0 = 3+2+4 = 9, r4 = 2+3+2 = 7, r1 = 1+1+0 = 2, r2 = 0+0+1 = 1
    assert [(p.chosen[:2], p.rejected[:2]) for p in pairs] == [("r3", "r1"), ("r3", "r2"), ("r0", "r1"), ("r0", "r2")]
    assert {p.prompt for p in pairs} == {"Write a short poem about the sea."}
    assert report.labelers_per_prompt == 3 and report.responses_per_prompt == 5
    # Kendall's W = 12 S / (m^2 (n^3 - n)), m = 3 labelers, n = 5 responses: rank sums (1 = best)
    # r0..r4 = 6, 13, 14, 4, 8 about their mean 9, so S = 9 + 16 + 25 + 25 + 1 = 76
    assert report.mean_kendall_w == pytest.approx(12 * 76 / (9 * 120))


@pytest.fixture
def reward_setup(tmp_path, tiny_tokenizer_dir):
    write_jsonl(tmp_path / "train.jsonl", synthetic_preferences(48, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", synthetic_preferences(32, seed=1))
    config = {
        "model": {"preset": "tiny", "vocab_size": 512},
        "optimizer": {"lr": 3e-3, "warmup_steps": 3, "schedule": "cosine", "min_lr_ratio": 0.1},
        "data": {"train_files": [str(tmp_path / "train.jsonl")], "eval_files": [str(tmp_path / "eval.jsonl")],
                 "tokenizer_path": tiny_tokenizer_dir, "max_length": 64, "batch_size": 8,
                 "bucket_boundaries": [32, 64]},
        "training": {"steps": 40, "seed": 0, "eval_every": 20, "save_every": 20, "keep_checkpoints": 2,
                     "output_dir": str(tmp_path / "run"), "log_every": 5},
        "logging": {"progress": False},
    }
    (tmp_path / "reward.yaml").write_text(json.dumps(config))
    return tmp_path, str(tmp_path / "reward.yaml")


@pytest.mark.parametrize("loss", ["margin_ranking", "bradley_terry"])
def test_learns_a_preference_to_95_percent_held_out(reward_setup, loss):
    tmp_path, config = reward_setup
    overrides = [f"loss.type={loss}"] + (["loss.margin=0"] if loss == "bradley_terry" else [])
    metrics = run_reward(load_config(RewardConfig, config, overrides))
    assert metrics["final/accuracy"] >= 0.95
    final = tmp_path / "run" / "final"
    assert read_config_kind(str(final)) == "score"
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["split"] == "eval" and stats["score_std"] > 0
    assert stats["ranking_records"] + stats["pair_records"] == 32  # the eval split's counts, as its statistics
    load_model(str(final))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final_eval = {k.removeprefix("eval/"): v for k, v in rows[-1].items() if k.startswith("eval/")}
    assert final_eval == {k.removeprefix("final/"): v for k, v in metrics.items() if k.startswith("final/")}
    documented = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    assert {key for row in rows for key in row if key != "step" and f"`{key.removeprefix('eval/')}`" not in documented} \
        == set()


def test_exact_resume_after_sigkill(reward_setup):
    tmp_path, config = reward_setup
    short = ["training.steps=8", "training.save_every=3", "training.eval_every=8"]
    assert cli.main(["reward", "--config", config, *short, f"training.output_dir={tmp_path / 'straight'}"]) == 0
    args = ["reward", "--config", config, *short, f"training.output_dir={tmp_path / 'resumed'}"]
    killed = run_cli_killed_at("icegrt_jax.train.reward", 6, "SIGKILL", args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert TrainCheckpointer(str(tmp_path / "resumed" / "checkpoints")).latest_step() == 3  # 6 never ran
    assert cli.main(args) == 0
    straight = jax.tree.leaves(load_model(str(tmp_path / "straight" / "final"))[1])
    resumed = jax.tree.leaves(load_model(str(tmp_path / "resumed" / "final"))[1])
    for a, b in zip(straight, resumed, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _with(record, **changes):
    return {**record, **changes}


BAD_RECORDS = {
    "not a permutation": ([_with(ranking_record(), rankings=[[3, 0, 4, 1, 1], [3, 4, 0, 1, 2], [0, 3, 4, 2, 1]])],
                          r"train\.jsonl:1: field 'rankings'.*appears more than once"),
    "ranking length": ([_with(ranking_record(), rankings=[[3, 0, 4, 1], [3, 4, 0, 1, 2], [0, 3, 4, 2, 1]])],
                       r"train\.jsonl:1: field 'rankings'.*expected 5"),
    "response count": ([ranking_record(), _with(ranking_record(), responses=["a", "b", "c", "d"],
                                                rankings=[[0, 1, 2, 3]] * 3)],
                       r"train\.jsonl:2: field 'responses' has 4 responses; earlier records have 5"),
    "labeler count": ([ranking_record(), _with(ranking_record(), rankings=[[0, 1, 2, 3, 4]] * 2)],
                      r"train\.jsonl:2: field 'rankings' has 2 labelers; earlier records have 3"),
    "truncated flags": ([_with(ranking_record(), truncated=[True, False])],
                        r"train\.jsonl:1: field 'truncated' must be a list of 5 true/false values, one a response"),
    "identical pair": ([{"prompt": "p", "chosen": "same", "rejected": "same"}],
                       r"train\.jsonl: no preference pairs \(.*1 identical pairs dropped\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_preference_data_is_one_line_exit_2_nothing_written(reward_setup, capsys, case):
    tmp_path, config = reward_setup
    records, message = BAD_RECORDS[case]
    write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError, match=message) as error:
        load_preferences([str(tmp_path / "train.jsonl")])
    assert cli.main(["reward", "--config", config]) == 2
    assert capsys.readouterr().err == f"icegrt reward: error: {error.value}\n"
    assert str(tmp_path / "train.jsonl") in str(error.value)
    assert not os.path.exists(tmp_path / "run")


def test_identical_ranked_responses_are_dropped_and_counted(tmp_path):
    record = _with(ranking_record(), responses=["same", "same", "b", "c", "same"])
    write_jsonl(tmp_path / "rank.jsonl", [record])
    pairs, report = load_preferences([str(tmp_path / "rank.jsonl")])
    # consensus [3, 0, 4, 1, 2]: pairs (3,1) (3,2) (0,1) (0,2); (0,1) is "same" vs "same"
    assert len(pairs) == 3 and report.identical_pairs_dropped == 1


def test_cut_and_empty_responses_are_trained_on_as_ppo_scores_them(tmp_path, tiny_tokenizer_dir):
    """No EOS after a response cut at the length limit (``truncated``, as ``icegrt sample`` writes);
    an empty response is the prompt then EOS, as a policy that ends at once generates it."""
    from icegrt_jax.data.templates import ICEGRT
    from icegrt_jax.data.tokenize import (
        load_tokenizer,
        tokenize_prompt,
        tokenize_response,
    )
    from icegrt_jax.train.reward import tokenize_pairs

    record = {"prompt": "p", "responses": ["a b", "", "c d", "e"], "rankings": [[0, 1, 2, 3]],
              "truncated": [True, False, False, False]}
    write_jsonl(tmp_path / "rank.jsonl", [record])
    pairs, _ = load_preferences([str(tmp_path / "rank.jsonl")])  # (0, 2) (0, 3) (1, 2) (1, 3)
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    examples, dropped = tokenize_pairs(pairs, tokenizer, ICEGRT, max_length=128)
    prompt, eos = tokenize_prompt(tokenizer, ICEGRT, "p").tolist(), tokenizer.eos_token_id
    response = lambda text: tokenize_response(tokenizer, ICEGRT, text)
    assert dropped == 0 and [p.chosen_ended for p in pairs] == [False, False, True, True]
    assert examples[0].chosen.input_ids.tolist() == prompt + response("a b")
    assert examples[0].rejected.input_ids.tolist() == prompt + response("c d") + [eos]
    assert examples[2].chosen.input_ids.tolist() == prompt + [eos]
    assert examples[0].chosen.response_mask.sum() == len(response("a b"))


def test_pairs_the_labelers_tie_on_are_dropped_and_counted(tmp_path):
    """Two labelers who disagree: a pair the consensus orders by index alone is no preference."""
    records = [{"prompt": "p", "responses": ["a", "b", "c", "d"], "rankings": [[0, 1, 2, 3], [3, 2, 1, 0]]},
               {"prompt": "q", "responses": ["a", "b", "c", "d"], "rankings": [[0, 1, 2, 3], [0, 2, 1, 3]]}]
    write_jsonl(tmp_path / "rank.jsonl", records)
    pairs, report = load_preferences([str(tmp_path / "rank.jsonl")])
    # first record: every response 6 points, every head-to-head 1-1; second: 1 and 2 tied
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("q", "a", "c"), ("q", "a", "d"), ("q", "b", "d")]
    assert report.tied_pairs_dropped == 5 and report.metrics()["tied_pairs_dropped"] == 5
    assert "; 5 pairs without a labeler majority for the consensus order (ties or cycles) dropped;" in report.summary()


def test_missing_backbone_or_data_is_one_line_exit_2(reward_setup, capsys):
    tmp_path, config = reward_setup
    assert cli.main(["reward", "--config", config, "model.preset=null", "model.hf_path=/nonexistent/sft"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.hf_path: /nonexistent/sft: no such directory" in err, err
    assert not os.path.exists(tmp_path / "run")
    assert cli.main(["reward", "--config", config, "data.train_files=[]"]) == 2
    assert "data.train_files: no preference files given" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("text, message", [
    ('{"score_mean": 0.5,', r"stats.json:1: invalid JSON"),
    ('[1, 2]', "expected one JSON object with score_mean and score_std"),
    ('{"score_mean": 0.5}', r"field 'score_std' must be a number, got None"),
    ('{"score_mean": "0.5", "score_std": 1}', r"field 'score_mean' must be a number, got '0.5'"),
    ('{"score_mean": 0.5, "score_std": 0}', r"score_std must be a positive number and score_mean finite \(got 0, 0.5\)"),
    ('{"score_mean": NaN, "score_std": 1.0}', r"score_std must be a positive number and score_mean finite"),
])
def test_bad_reward_stats_file_is_a_one_line_error(tmp_path, text, message):
    path = tmp_path / "stats.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as error:
        read_reward_stats(str(path))
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    path.write_text('{"score_mean": 0.5, "score_std": 2, "accuracy": 0.9}')
    assert read_reward_stats(str(path))["score_std"] == 2
