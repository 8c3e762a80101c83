"""The lm-eval backend and the paper's settings: parity with lm-eval's transformers backend on the
same weights, simple_evaluate end to end on local data in the upstream schemas, and bad input."""

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import make_hf_llama
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from icegrt_jax.cli import main
from icegrt_jax.commands.eval import model_labels
from icegrt_jax.data.tokenize import load_tokenizer
from icegrt_jax.errors import UserInputError
from icegrt_jax.eval import MissingExtraError, require_lm_eval
from icegrt_jax.eval.lm_eval_backend import IceGRTLM, early_stop_ids, scoring_rows
from icegrt_jax.eval.tasks import (
    LocalDataError,
    UnknownTaskError,
    build_task_manager,
    data_splits,
    load_benchmarks,
    local_split_path,
    resolve_names,
    run_benchmarks,
)

TABLE1_COLUMNS = ["MMLU 5-shot", "AGIEval few-shot", "BBH 3-shot", "AGIEval-ZH few-shot", "ARC-E 1-shot",
                  "ARC-C 1-shot", "HellaSWAG 1-shot", "Winogrande 1-shot", "RACE-M 1-shot", "RACE-H 1-shot",
                  "GSM8K 8-shot", "Math 4-shot"]
LONG_TEXT = " ".join(f"The quick brown fox number {i} jumps over the lazy dog." for i in range(40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A random tiny HF LLaMA (vocab 512, context 256) with the tiny tokenizer beside it."""
    path = tmp_path_factory.mktemp("tiny_eval_model") / "model_a"
    torch_model = make_hf_llama(path, vocab=512)
    shutil.copytree(tiny_tokenizer_dir, path, dirs_exist_ok=True)
    return path, torch_model


@pytest.fixture(scope="module")
def backends(model_dir):
    """(ours, lm-eval's hf backend) over the same weights and tokenizer."""
    from lm_eval.models.huggingface import HFLM  # the test extra installs lm-eval[hf]

    path, torch_model = model_dir
    ours = IceGRTLM(pretrained=str(path), batch_size=4, max_gen_toks=12)
    theirs = HFLM(pretrained=torch_model, tokenizer=ours.tokenizer, batch_size=4, max_length=256)
    return ours, theirs


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_registered_under_icegrt(model_dir):
    """By name, as ``simple_evaluate(model="icegrt", model_args=...)`` builds it."""
    assert get_model("icegrt") is IceGRTLM
    lm = get_model("icegrt").create_from_arg_string(f"pretrained={model_dir[0]},batch_size=auto,max_length=64",
                                                    {"device": "cpu"})
    assert (lm.batch_size, lm.max_length, lm.truncated) == (16, 64, {})


def test_loglikelihood_matches_transformers(backends, caplog):
    ours, theirs = backends
    before = ours.truncated["loglikelihood"]
    question = "Question: What is the capital of France?\nAnswer:"
    pairs = [(question, f" {letter}") for letter in "ABCD"]  # one forward pass for all four
    pairs += [(question, " The capital of France is Paris."), ("", "Waves roll in and out again."),
              ("Write a short poem about the sea.", " Waves roll in"), (LONG_TEXT, " and out again.")]
    got = ours.loglikelihood(requests("loglikelihood", pairs))
    want = theirs.loglikelihood(requests("loglikelihood", pairs))
    # LONG_TEXT is longer than the context: left-truncated (as lm-eval's hf backend), counted and said
    assert ours.truncated["loglikelihood"] - before == 1
    assert "1 of 8 loglikelihood requests left-truncated to fit max_length 256" in caplog.text
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)  # fp32 sums of a few log-probs

    # is_greedy on continuations that are the model's own argmax tokens (token level: decoding and
    # re-encoding text can change the ids), and on the same with one token changed
    context = ours.tok_encode(question)
    greedy = theirs.model.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False, pad_token_id=0,
                                   eos_token_id=None)[0, len(context):].tolist()
    token_requests = [((question, ""), context, greedy[:n]) for n in (1, 3)]
    token_requests += [((question, ""), context, greedy[:2] + [(greedy[2] + 1) % 512]),
                       ((question, ""), context, [(greedy[0] + 7) % 512] + greedy[1:])]
    got, want = ours._loglikelihood_tokens(token_requests), theirs._loglikelihood_tokens(token_requests)
    assert [g[1] for g in got] == [w[1] for w in want] == [True, True, False, False]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)

    docs = [("Numbers: 0 1 2 3 4 5 6 7 8 9.",), (LONG_TEXT,)]  # the long one spans two windows
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", docs))
    want = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", docs))
    # The long document's sum is ~-6000 over hundreds of fp32 token log-probs: matmul reduction
    # order alone moves it by ~2e-4 (3e-8 relative), so 1e-6 relative on top of 1e-4 absolute; a
    # wrong or shifted token moves a sum by far more.
    assert got == pytest.approx(want, rel=1e-6, abs=1e-4)


def test_generate_until_matches_transformers(backends):
    """Greedy, cut at stop strings; the prompts are left-truncated to max_length - max_gen_toks, so
    they share their compiled shapes with the gsm8k run of the end-to-end test. The stop strings
    are taken from the uncut outputs, so that they do cut: a single-token one (which also ends its
    row early, ``early_stop_ids``) and a two-character one."""
    ours, theirs = backends
    before = ours.truncated["generate_until"]
    endings = [" Question: What is the capital of France?\nAnswer:", " The quick brown fox", " Numbers: 0 1 2"]
    uncut = {"until": ["Q:"], "do_sample": False, "max_gen_toks": 12}
    prompts = [(LONG_TEXT + end, uncut) for end in endings]
    full = ours.generate_until(requests("generate_until", prompts))
    assert full == theirs.generate_until(requests("generate_until", prompts))
    assert ours.truncated["generate_until"] - before == len(prompts)  # every prompt starts with LONG_TEXT

    two_chars = full[1][4:6]
    tokens = ours.tok_encode(full[0])
    one_token = next(text for text in map(ours.tokenizer.decode, ([t] for t in tokens[2:]))
                     if len(ours.tok_encode(text)) == 1 and text[-1] not in two_chars)
    stops = {"until": [one_token, two_chars], "do_sample": False, "max_gen_toks": 12}
    assert early_stop_ids(ours.tokenizer, stops["until"]) == tuple(ours.tok_encode(one_token))
    cut_prompts = [(prompt, stops) for prompt, _ in prompts]
    got = ours.generate_until(requests("generate_until", cut_prompts))
    assert got == theirs.generate_until(requests("generate_until", cut_prompts))
    assert len(got[0]) < len(full[0]) and len(got[1]) < len(full[1])


def test_scoring_rows_group_shared_inputs():
    rows = scoring_rows([([1, 5], [7]), ([1, 5], [8]), ([1], [5, 9]), ([1, 2, 3], [4])], max_length=8)
    assert [(r.inputs, r.num_continuation, r.requests) for r in rows] == [
        ((1, 2, 3), 1, [(3, 4)]), ((1, 5), 1, [(0, 7), (1, 8)]), ((1, 5), 2, [(2, 9)])]
    (row,) = scoring_rows([(list(range(1, 10)), [10, 11])], max_length=4)  # truncated from the left
    assert row.inputs == (7, 8, 9, 10) and row.requests == [(0, 11)]


def test_early_stop_ids(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    newline, dot = (tokenizer.encode(s, add_special_tokens=False)[0] for s in ("\n", "."))
    assert early_stop_ids(tokenizer, ["\n", ".", "Question:"]) == (newline, dot)
    assert early_stop_ids(tokenizer, [".", "x.y"]) == ()  # "." could be the middle of a longer stop


# --- the paper's settings and local data ----------------------------------------------------------

def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """ARC-Easy and GSM8K items in the schemas of allenai/ai2_arc and openai/gsm8k."""
    root = tmp_path_factory.mktemp("eval_data")
    arc = [{"id": f"q{i}", "question": f"What is {i} plus one?",
            "choices": {"text": [str(i + 1), str(i + 2), "a fox", "the sea"], "label": ["A", "B", "C", "D"]},
            "answerKey": "A"} for i in range(4)]
    for split in ("train", "test"):
        write_jsonl(root / "allenai/ai2_arc/ARC-Easy" / f"{split}.jsonl", arc)
    gsm8k = [{"question": f"Tom has {i} apples and buys 2 more. How many apples does he have?",
              "answer": f"He has {i} + 2 = {i + 2} apples.\n#### {i + 2}"} for i in range(3)]
    write_jsonl(root / "openai/gsm8k/main/test.jsonl", gsm8k)
    return root


def test_paper_settings():
    benchmarks = load_benchmarks()
    table1 = resolve_names(["table1"], benchmarks)
    assert [benchmarks[n].column for n in table1] == TABLE1_COLUMNS
    assert resolve_names(["ablation"], benchmarks) == ["icegrt_nq", "icegrt_webqs", "icegrt_lambada"]
    assert resolve_names(["arc_e", "icegrt_arc_e", "table1"], benchmarks)[:2] == ["icegrt_arc_e", "icegrt_mmlu"]
    assert benchmarks["icegrt_gsm8k"].metric == "exact_match,flexible-extract"
    assert {benchmarks[n].scoring for n in table1} == {"loglikelihood", "generate"}


def test_lambada_shot_reads_like_the_scored_passage(tmp_path):
    """The 1-shot example is the passage with its last word, one space before it, as the scored
    continuation (lm-eval's lambada target carries its own space)."""
    from lm_eval.tasks import get_task_dict

    passages = [{"text": f"the cat number {i} sat on the mat"} for i in range(3)]
    write_jsonl(tmp_path / "data/EleutherAI/lambada_openai/default/test.jsonl", passages)
    manager = build_task_manager(["icegrt_lambada"], load_benchmarks(), data_dir=tmp_path / "data",
                                 work_dir=tmp_path / "work")
    (group,) = get_task_dict(["icegrt_lambada"], manager).values()
    task = group["lambada_openai"]
    task.build_all_requests(limit=1, rank=0, world_size=1)
    assert task.instances[0].args == ("the cat number 1 sat on the mat\n\nthe cat number 0 sat on the", " mat")


def test_local_data_layout_and_splits(tmp_path):
    arc = {"task": "arc_easy", "dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy",
           "training_split": "train", "validation_split": "validation", "test_split": "test"}
    assert data_splits(arc) == ("test", "train")
    assert local_split_path(tmp_path, arc, "test") == tmp_path / "allenai/ai2_arc/ARC-Easy/test.jsonl"
    inline_shots = {"test_split": "test", "fewshot_config": {"samples": [{"question": "q"}]}}
    assert data_splits(inline_shots) == ("test", None)
    assert data_splits({"validation_split": "validation", "fewshot_split": "dev"}) == ("validation", "dev")
    assert local_split_path(tmp_path, {"dataset_path": "Rowan/hellaswag"}, "train") == tmp_path / "Rowan/hellaswag/train.jsonl"


def test_eval_cli_end_to_end_two_models(model_dir, data_dir, tmp_path, capsys):
    """simple_evaluate: a log-likelihood task and a generation task on local data, two models side
    by side."""
    path_a, _ = model_dir
    path_b = path_a.parent / "model_b"
    make_hf_llama(path_b, vocab=512, seed=1)
    shutil.copytree(path_a, path_b, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(path_a), "--model", str(path_b), "--tasks", "arc_e,gsm8k",
                 "--data-dir", str(data_dir), "--output", str(out), "--batch-size", "4", "--max-gen-toks", "12",
                 "--limit", "3"]) == 0
    captured = capsys.readouterr()
    shown = captured.out
    assert "| Model | ARC-E 1-shot | GSM8K 8-shot |" in shown and "| model_b |" in shown
    report = json.loads((out / "results.json").read_text())
    # gsm8k's 8-shot prompts do not fit the tiny model's 256 - 12 tokens: counted and said
    assert "model_a: requests whose context was left-truncated to fit the context length: 3 generate_until" \
        in captured.err
    assert "Note: requests whose context was left-truncated" in (out / "results.md").read_text()
    assert report["limit"] == 3 and "Only the first 3 documents of each task" in (out / "results.md").read_text()
    for label in ("model_a", "model_b"):
        model = report["models"][label]
        assert (model["n_shot"]["arc_easy"], model["n_shot"]["gsm8k_cot"]) == (1, 8)
        assert model["truncated_requests"] == {"generate_until": 3}
        raw = json.loads((out / label / "lm_eval_results.json").read_text())
        assert model["scores"] == {name: raw["results"][name][report["benchmarks"][name]["metric"]]
                                   for name in ("icegrt_arc_e", "icegrt_gsm8k")}  # each one's headline metric
        assert raw["results"]["arc_easy"]["sample_len"] == 3 and raw["results"]["gsm8k_cot"]["sample_len"] == 3
        assert raw["config"]["model_args"]["pretrained"] == str(path_a.parent / label)  # reproducible from the file
    assert "dataset_path: json" in (out / "model_a/local_tasks/arc_easy.yaml").read_text()


def test_a_rerun_reuses_a_models_results_only_while_nothing_they_depend_on_changed(model_dir, data_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    """A failed or stopped run of several models resumes at the first unfinished one: a model's
    results are reused when its settings and files are the same, computed anew otherwise."""
    from icegrt_jax.eval import lm_eval_backend

    path, _ = model_dir
    out = tmp_path / "out"
    argv = ["eval", "--model", str(path), "--tasks", "arc_e", "--data-dir", str(data_dir), "--output", str(out),
            "--batch-size", "4", "--limit", "2"]
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()

    def evaluated_again(**_):
        raise AssertionError("the model was evaluated again")

    monkeypatch.setattr(lm_eval_backend, "IceGRTLM", evaluated_again)
    assert main(argv) == 0
    assert f"model_a: results of an earlier run with the same settings reused ({out / 'model_a'})" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == first
    with pytest.raises(AssertionError, match="evaluated again"):  # another --limit
        main(argv[:-1] + ["3"])
    os.utime(path / "config.json", ns=(0, 0))  # the model's files changed since
    with pytest.raises(AssertionError, match="evaluated again"):
        main(argv)


def test_a_failed_run_removes_only_the_directories_it_made_that_are_still_empty(tmp_path):
    from icegrt_jax.files import outermost_missing, remove_made_directories

    out = tmp_path / "new" / "deeper" / "out"
    created = outermost_missing(out)
    out.mkdir(parents=True)
    (out / "partial.json").write_text("{}")
    (tmp_path / "new" / "other-run").mkdir()  # another run's output, made since
    remove_made_directories(out, created)
    assert created == tmp_path / "new" and sorted(p.name for p in created.iterdir()) == ["other-run"]
    remove_made_directories(tmp_path / "new" / "other-run", created)
    assert list(tmp_path.iterdir()) == []


def test_model_labels_are_unique_directory_names():
    assert model_labels(["runs/a/ckpt", "runs/b/ckpt/", "runs/c"]) == ["ckpt", "ckpt-2", "c"]


# --- bad input ------------------------------------------------------------------------------------

def test_unknown_task_name(capsys):
    with pytest.raises(UnknownTaskError, match="unknown task 'mmlu_pro'.*arc_e"):
        resolve_names(["mmlu_pro"], load_benchmarks())
    assert main(["eval", "--model", ".", "--tasks", "arc_e,nonsense"]) == 2
    assert "unknown task 'nonsense'" in capsys.readouterr().err


def test_output_that_is_a_file(model_dir, data_dir, tmp_path, capsys):
    (tmp_path / "results").write_text("mine")
    assert main(["eval", "--model", str(model_dir[0]), "--tasks", "arc_e", "--output", str(tmp_path / "results")]) == 2
    assert "results: exists and is not a directory; choose another --output directory" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir[0]), "--tasks", "arc_e", "--data-dir", str(tmp_path / "nowhere"),
                 "--output", str(out)]) == 2
    assert "nowhere: no such data directory" in capsys.readouterr().err
    assert not out.exists()  # the data is checked before anything is written or loaded
    out.mkdir()
    assert main(["eval", "--model", str(model_dir[0]), "--tasks", "arc_c", "--data-dir", str(data_dir),
                 "--output", str(out)]) == 2
    assert "missing 2 local data file(s)" in capsys.readouterr().err and list(out.iterdir()) == []
    out.rmdir()
    broken = tmp_path / "broken"  # its config and tokenizer pass the checks; its weights fail to load
    shutil.copytree(model_dir[0], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 8)
    assert main(["eval", "--model", str(broken), "--tasks", "arc_e", "--data-dir", str(data_dir),
                 "--output", str(tmp_path / "new" / "deeper" / "out")]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # a failed run leaves no directory it made behind
    assert main(["eval", "--model", str(model_dir[0]), "--tasks", ",", "--output", str(out)]) == 2
    assert "--tasks ',': no task names given" in capsys.readouterr().err and not out.exists()
    for flag in ("--limit", "--max-length", "--max-gen-toks", "--batch-size"):
        assert main(["eval", "--model", str(model_dir[0]), "--tasks", "arc_e", flag, "0", "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"{flag} must be positive, got 0") and len(err.splitlines()) == 1 and not out.exists()


def test_missing_data_file(data_dir, tmp_path):
    benchmarks = load_benchmarks()
    with pytest.raises(LocalDataError, match=r"missing 2 local data file.*ARC-Challenge/test\.jsonl, .*/train\.jsonl"):
        build_task_manager(["icegrt_arc_c"], benchmarks, data_dir=data_dir, work_dir=tmp_path)
    with pytest.raises(LocalDataError, match="no such data directory"):
        build_task_manager(["icegrt_arc_c"], benchmarks, data_dir=tmp_path / "nowhere", work_dir=tmp_path)


def test_a_bad_local_data_line_is_named_before_anything_runs(data_dir, tmp_path):
    """Where lm-eval would fail inside ``datasets`` or a prompt template, with a traceback."""
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    test_file = bad / "allenai/ai2_arc/ARC-Easy/test.jsonl"
    first, second = test_file.read_text().splitlines()[:2]
    build = lambda: build_task_manager(["icegrt_arc_e"], load_benchmarks(), data_dir=bad, work_dir=tmp_path / "w")
    test_file.write_text(f"{first}\n{json.dumps({'id': 'q9', 'question': 'no choices'})}\n")
    with pytest.raises(LocalDataError, match=r"ARC-Easy/test\.jsonl:2: missing field 'choices' \(the file's first"):
        build()
    test_file.write_text(f"{first}\n{second[:-1]}\n")  # its closing brace lost
    with pytest.raises(LocalDataError, match=rf"test\.jsonl:2: invalid JSON \(.* at column {len(second)}\)"):
        build()
    test_file.write_text(f"{first}\n[1, 2]\n")
    with pytest.raises(LocalDataError, match=r"test\.jsonl:2: expected a JSON object, got list"):
        build()


def test_run_benchmarks_without_a_work_dir_keeps_its_override_yamls_only_while_it_runs(data_dir, tmp_path,
                                                                                        monkeypatch):
    import lm_eval

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def fake_evaluate(task_manager, **kwargs):
        seen.extend(tmp_path.glob("icegrt_eval_*/local_tasks/*.yaml"))
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    assert run_benchmarks("icegrt", ["icegrt_arc_e"], data_dir=data_dir) == {"results": {}}
    assert len(seen) == 1 and list(tmp_path.iterdir()) == []  # there during the run, removed after


def test_missing_lm_eval_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingExtraError, match=r"pip install icegrt-jax\[eval\]"):
        require_lm_eval()
    assert main(["eval", "--model", ".", "--tasks", "arc_e"]) == 2
    assert "pip install icegrt-jax[eval]" in capsys.readouterr().err


def _no_model_loads(monkeypatch):
    import icegrt_jax.eval.lm_eval_backend as backend

    def refuse(**kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(backend, "IceGRTLM", refuse)


def test_an_unwritable_output_fails_before_any_model_loads(model_dir, data_dir, monkeypatch, capsys):
    """/proc exists but no file can be made in it (not even by root)."""
    _no_model_loads(monkeypatch)
    assert main(["eval", "--model", str(model_dir[0]), "--tasks", "arc_e", "--data-dir", str(data_dir),
                 "--output", "/proc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("icegrt eval: error: /proc/results.json: cannot write (")


def test_an_unwritable_task_directory_is_one_line(tmp_path):
    from icegrt_jax.eval.tasks import write_local_overrides

    with pytest.raises(UserInputError, match=r"^/proc/x/local_tasks.tmp-\d+: cannot create the directory of the "):
        write_local_overrides({}, Path("/proc/x/local_tasks"))


def test_no_connection_to_the_hub_is_one_line_before_any_model_loads(model_dir, tmp_path, monkeypatch, capsys):
    """Without --data-dir the benchmark data comes from the hub: unreachable (simulated: datasets'
    own ConnectionError after its retries), it is one line pointing to --data-dir."""
    import datasets

    def offline(*args, **kwargs):
        hub_logs = logging.getLogger("huggingface_hub")  # its retries would print ~10 warning lines
        assert not hub_logs.isEnabledFor(logging.WARNING) and not logging.getLogger("datasets").isEnabledFor(logging.WARNING)
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    _no_model_loads(monkeypatch)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir[0]), "--tasks", "arc_e", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("icegrt eval: error: Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError): "
                          "the benchmark data cannot be downloaded; evaluate on local files with --data-dir")
    assert not out.exists()
