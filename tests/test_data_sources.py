"""Where records come from: hub names or paths, folders of hub files, blank lines and repeated
records (counted in the data reports), the pair shapes and what pairs are dropped. No network."""

import json
import logging

import pytest

from icegrt_jax.data import sources
from icegrt_jax.data.preferences import load_preferences
from icegrt_jax.data.sources import (
    DataError,
    SourceReport,
    is_hub_name,
    load_conversations,
)
from icegrt_jax.data.templates import ICEGRT, Round
from icegrt_jax.data.tokenize import load_tokenizer, tokenize_conversations

RANKINGS = [[0, 1, 2, 3, 4], [0, 2, 3, 1, 4], [0, 3, 1, 2, 4]]  # a cycle: 1 > 2 > 3 > 1 by majority


def write_jsonl(path, lines):
    """``lines``: records (written as JSON) or "" for a blank line."""
    path.write_text("".join((json.dumps(line) if line != "" else "") + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub lookup fails the test."""
    def refuse(spec):
        raise AssertionError(f"{spec} was sent to the hub")

    monkeypatch.setattr(sources, "_open_hub_dataset", refuse)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# --- hub names and paths ----------------------------------------------------------------------

@pytest.mark.parametrize("spec, hub", [
    ("imdb", True), ("Anthropic/hh-rlhf", True), ("HuggingFaceH4/ultrafeedback_binarized:train_prefs", True),
    ("teknium/OpenHermes-2.5", True), ("org/name:train[:10%]", True),
    ("data/x.json", False), ("data/x.CSV", False), ("notes.txt", False), ("train.jsonl", False),
    ("./data", False), ("../data", False), ("/abs/data", False), ("a/b/c", False), ("org/", False),
    ("-org/name", False), ("", False),
])
def test_only_specs_shaped_like_hub_names_are_hub_names(spec, hub):
    assert is_hub_name(spec) is hub


def test_a_missing_local_path_fails_at_once_with_one_line(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for spec in ("data/x.json", "./data/x", "data/more/x"):
        with pytest.raises(DataError) as error:
            load_conversations([spec])
        assert str(error.value) == f"{spec}: no such file"


def test_a_hub_lookup_logs_nothing_and_fails_in_one_line(monkeypatch, caplog, capsys):
    import datasets

    def offline(name, split):
        for logger in ("huggingface_hub.utils._http", "datasets.load"):
            logging.getLogger(logger).warning("retrying in 1s [Retry 1/5]")
        raise ConnectionError("offline\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as error:
        load_conversations(["org/name:test"])
    assert str(error.value) == ("org/name:test: no such local file, and loading it as a hub dataset failed "
                                "(ConnectionError: offline second line)")
    assert not caplog.records and not capsys.readouterr().err
    assert logging.getLogger("huggingface_hub").level != logging.CRITICAL  # restored


def test_a_folder_of_a_hub_datasets_files_loads_locally(tmp_path, datasets_cache, no_hub):
    import datasets

    folder = tmp_path / "hubclone"
    (folder / "data").mkdir(parents=True)
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": "s"}]
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    loaded = load_conversations([str(folder)])
    assert [(c.rounds, c.source) for c in loaded] == [((Round("p", "r"),), f"{folder} row 0"),
                                                        ((Round("q", "s"),), f"{folder} row 1")]


# --- blank lines and repeated records -----------------------------------------------------------

def test_sft_report_counts_blank_lines_and_repeated_records(tmp_path, tiny_tokenizer_dir):
    a, b = {"prompt": "p", "response": "r"}, {"prompt": "q", "response": "s"}
    first = write_jsonl(tmp_path / "a.jsonl", [a, "", b, "", a])
    second = write_jsonl(tmp_path / "b.jsonl", [b])
    source = SourceReport()
    conversations = load_conversations([first, second], source)
    assert len(conversations) == 4  # repeats are kept
    assert source.metrics() == {"blank_lines": 2, "repeated_records": 2}
    _, report = tokenize_conversations(conversations, load_tokenizer(tiny_tokenizer_dir), ICEGRT,
                                       max_length=64, truncation="drop_example", source=source)
    assert report.summary().endswith(f"; 2 blank lines skipped; 2 records repeat an earlier one (kept: {first}:5 "
                                     f"repeats {first}:1, {second}:1 repeats {first}:3)")


def test_a_load_without_blank_lines_or_repeats_reports_neither(tmp_path):
    report = SourceReport()
    load_conversations([write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])], report)
    assert report.summary() == ""
    report.add("x:1", {"k": 1})
    report.add("x:2", {"k": 1})
    assert report.summary() == "1 record repeats an earlier one (kept: x:2 repeats x:1)"


def test_preference_report_counts_blank_lines_and_repeated_records(tmp_path):
    pair = {"prompt": "p", "chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair, "", pair])
    pairs, report = load_preferences([path])
    assert len(pairs) == 2 and report.metrics()["blank_lines"] == 1 and report.metrics()["repeated_records"] == 1
    assert report.summary().endswith(f"; 1 blank line skipped; 1 record repeats an earlier one (kept: {path}:3 "
                                     f"repeats {path}:1)")


# --- rankings and pairs -----------------------------------------------------------------------

def test_a_cycle_among_three_labelers_drops_the_pair_against_the_majority(tmp_path):
    record = {"prompt": "p", "responses": ["r0", "r1", "r2", "r3", "r4"], "rankings": RANKINGS}
    pairs, report = load_preferences([write_jsonl(tmp_path / "rank.jsonl", [record])])
    # consensus [0, 1, 2, 3, 4] (1, 2, 3: 6 points, one head-to-head win each); 2 of 3 prefer r3 to r1
    assert [(p.chosen, p.rejected) for p in pairs] == [("r0", "r3"), ("r0", "r4"), ("r1", "r4")]
    assert report.tied_pairs_dropped == 1
    assert ("; 1 pairs without a labeler majority for the consensus order (ties or cycles) dropped;"
            in report.summary())


def test_a_short_ranking_names_its_labeler(tmp_path):
    record = {"prompt": "p", "responses": ["a", "b", "c", "d", "e"], "rankings": [RANKINGS[0], [0, 1, 2, 3], RANKINGS[2]]}
    path = write_jsonl(tmp_path / "rank.jsonl", [record])
    with pytest.raises(DataError) as error:
        load_preferences([path])
    assert str(error.value) == f"{path}:1: field 'rankings': labeler 1 ranks 4 responses, expected 5"


def test_identical_chosen_and_rejected_are_dropped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"},
                                                   {"prompt": "p", "chosen": "good", "rejected": "bad"}])
    pairs, report = load_preferences([path])
    assert [(p.chosen, p.rejected) for p in pairs] == [("good", "bad")]
    assert (report.pair_records, report.identical_pairs_dropped) == (2, 1)
    only = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match=r"same\.jsonl: no preference pairs \(.*1 identical pairs dropped\)$"):
        load_preferences([only])


def ultrafeedback(prompt, chosen, rejected):
    def messages(response):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    return {"prompt": prompt, "prompt_id": "abc", "chosen": messages(chosen), "rejected": messages(rejected),
            "messages": messages(chosen), "score_chosen": 8.0, "score_rejected": 3.0}


def test_ultrafeedback_binarised_pairs_load(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback("p", "good", "bad")])
    pairs, report = load_preferences([path])
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p", "good", "bad")]
    assert report.pair_records == 1


@pytest.mark.parametrize("change, message", [
    (lambda r: r["chosen"].append({"role": "user", "content": "more"}),
     "field 'chosen' must be a string or two messages, the prompt's user turn and the assistant's response"),
    (lambda r: r["rejected"][0].update(content="another prompt"), "field 'rejected[0].content' differs from field 'prompt'"),
    (lambda r: r["chosen"][1].update(content=""), "field 'chosen[1].content' is empty"),
    (lambda r: r["rejected"].reverse(), "field 'rejected' must be a string or two messages"),
])
def test_bad_ultrafeedback_messages_are_one_line_errors(tmp_path, change, message):
    record = ultrafeedback("p", "good", "bad")
    change(record)
    path = write_jsonl(tmp_path / "uf.jsonl", [record])
    with pytest.raises(DataError) as error:
        load_preferences([path])
    assert str(error.value).startswith(f"{path}:1: {message}")


# --- icegrt sample's prompt ids -----------------------------------------------------------------

def test_sample_prompt_ids_are_line_numbers_blank_lines_counted(tmp_path, tiny_tokenizer_dir):
    from helpers import make_hf_llama

    from icegrt_jax import cli

    model = tmp_path / "model"
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    make_hf_llama(model, vocab=len(tokenizer), hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32)
    tokenizer.save_pretrained(model)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ["", {"prompt": "a"}, "", {"prompt": "b", "id": "x"},
                                                       {"prompt": "c"}])
    out = tmp_path / "annotate.jsonl"
    assert cli.main(["sample", "--model", str(model), "--prompts", prompts, "--n", "2", "--out", str(out),
                     "--max-new-tokens", "2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_id"], r["prompt"]) for r in records] == [("2", "a"), ("x", "b"), ("5", "c")]
