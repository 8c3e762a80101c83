"""SFT data pipeline: template, loading and validation, tokenisation masks, truncation, batching."""

import dataclasses
import json

import numpy as np
import pytest

from icegrt_jax.data.batching import (
    BatchIterator,
    DataPosition,
    bucket_lengths,
    collate,
    eval_batches,
    padded_length,
    plan_epoch,
)
from icegrt_jax.data.sources import Conversation, DataError, load_conversations
from icegrt_jax.data.templates import ICEGRT, Round, get_template, render
from icegrt_jax.data.tokenize import (
    TokenizedExample,
    first_kept_round,
    load_tokenizer,
    pad_token_id,
    tokenize_conversations,
    tokenize_prompt,
)

PAPER_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request. ### USER: <INPUT> ASSISTANT: <OUTPUT>"
)
CONVERSATIONS = [
    Conversation((Round("What is the capital of France?", "Paris."),), "a:1"),
    Conversation((Round("Hi", "Hello! How can I help?"), Round("A poem, please.", "Waves roll in."),
                  Round("Shorter, and say </s>?", "Sea </s> sea.")), "a:2"),
    Conversation((Round("Count to three.", "1 2 3"),), "a:3"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def fake_examples(lengths):
    """Examples with the given lengths whose ids encode their index (for batching tests)."""
    return [TokenizedExample(np.full(n, i, np.int32), np.arange(n) % 2 == 1, f"x:{i}")
            for i, n in enumerate(lengths)]


# --- template -------------------------------------------------------------------------------

def test_single_round_renders_the_paper_template_verbatim():
    text = render(get_template("icegrt"), [Round("<INPUT>", "<OUTPUT>")], eos="")
    assert text == PAPER_TEMPLATE


def test_a_generated_response_loses_only_the_templates_separator():
    # after " ASSISTANT:" the model emits the separator inside its first token (" The"); the text
    # the data files hold is the response alone, which ``response`` renders back to what was generated
    for decoded, text in ((" The answer is 3.", "The answer is 3."), ("  indented", " indented"), ("no space", "no space")):
        assert ICEGRT.response_text(decoded) == text
    assert ICEGRT.response(ICEGRT.response_text(" The answer")) == " The answer"


def test_multi_round_repeats_user_assistant_with_eos_after_each_output():
    rounds = [Round("q1", "a1"), Round("q2", "a2")]
    assert render(ICEGRT, rounds, eos="</s>") == (
        ICEGRT.preamble + " ### USER: q1 ASSISTANT: a1</s> ### USER: q2 ASSISTANT: a2</s>")
    assert render(ICEGRT, rounds[:1], eos="</s>", next_user="q2") == (
        ICEGRT.preamble + " ### USER: q1 ASSISTANT: a1</s> ### USER: q2 ASSISTANT:")


# --- tokenisation and masks -----------------------------------------------------------------

def test_loss_mask_covers_exactly_the_outputs_and_their_eos(tokenizer):
    examples, _ = tokenize_conversations(CONVERSATIONS, tokenizer, ICEGRT, max_length=512,
                                         truncation="drop_example")
    batch = collate(examples, bucket_lengths([64, 128], 512), pad_token_id(tokenizer))
    for row, conversation in enumerate(CONVERSATIONS):
        trained = batch["targets"][row][batch["loss_mask"][row] == 1]
        assert tokenizer.decode(trained) == "".join(f" {r.assistant}</s>" for r in conversation.rounds)
        real = batch["input_ids"][row][batch["attention_mask"][row] == 1]
        assert real[0] == tokenizer.bos_token_id
        assert tokenizer.decode(real[1:]) == render(ICEGRT, conversation.rounds, eos="</s>")
        # "</s>" typed inside a message stays text: the only EOS tokens end the rounds
        assert (real == tokenizer.eos_token_id).sum() == len(conversation.rounds)
        assert not batch["loss_mask"][row][batch["attention_mask"][row] == 0].any()
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])


def test_generation_prompt_is_the_training_prefix(tokenizer):
    conversation = CONVERSATIONS[1]
    [example], _ = tokenize_conversations([conversation], tokenizer, ICEGRT, max_length=512,
                                          truncation="drop_example")
    prompt = tokenize_prompt(tokenizer, ICEGRT, conversation.rounds[-1].user, conversation.rounds[:-1])
    last_output_start = np.flatnonzero(~example.response_mask)[-1] + 1
    assert len(prompt) == last_output_start
    np.testing.assert_array_equal(example.input_ids[:last_output_start], prompt)


# --- truncation -----------------------------------------------------------------------------

@pytest.mark.parametrize("policy, expected", [
    ("drop_example", [0, None, None, None]),
    ("drop_earliest_rounds", [0, 1, 2, None]),
])
def test_first_kept_round(policy, expected):
    cases = [[3, 3], [6, 3], [5, 5, 4], [2, 11]]  # head 2, max_length 10
    assert [first_kept_round(2, rounds, 10, policy) for rounds in cases] == expected


def test_truncation_report_counts_what_was_cut(tokenizer):
    short = Conversation((Round("Hi", "Yo"),), "b:1")
    long_tail = Conversation((Round("x", "y"), Round("z", "long " * 80)), "b:2")
    three_rounds = Conversation(CONVERSATIONS[1].rounds, "b:3")
    data = [short, long_tail, three_rounds]
    [last_round_only], _ = tokenize_conversations(
        [Conversation(three_rounds.rounds[-1:], "")], tokenizer, ICEGRT, max_length=512,
        truncation="drop_example")
    max_length = len(last_round_only)  # fits `short` and only the last round of `three_rounds`

    examples, report = tokenize_conversations(data, tokenizer, ICEGRT, max_length=max_length,
                                              truncation="drop_earliest_rounds")
    assert report.metrics() == {"examples": 3, "kept_whole": 1, "shortened": 1,
                                "rounds_removed": 2, "dropped": 1}
    assert report.dropped_sources == ["b:2"] and "b:2" in report.summary()
    assert [e.source for e in examples] == ["b:1", "b:3"]
    assert max(len(e) for e in examples) <= max_length
    shortened = tokenizer.decode(examples[1].input_ids[1:])
    assert shortened == render(ICEGRT, three_rounds.rounds[2:], eos="</s>")

    examples, report = tokenize_conversations(data, tokenizer, ICEGRT, max_length=max_length,
                                              truncation="drop_example")
    assert report.metrics()["dropped"] == 2 and [e.source for e in examples] == ["b:1"]


# --- loading and validation -----------------------------------------------------------------

def test_loads_both_schemas_from_jsonl_parquet_and_arrow(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    records = [
        {"prompt": "p", "response": "r", "id": 7},
        {"conversations": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                           {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]},
    ]
    jsonl = write_jsonl(tmp_path / "d.jsonl", [json.dumps(records[0]), "", json.dumps(records[1])])
    table = datasets.Dataset.from_list([{**records[0], "conversations": None},
                                        {"prompt": None, "response": None, **records[1]}])
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    arrow = str(next((tmp_path / "saved").glob("*.arrow")))
    expected = [(Round("p", "r"),), (Round("u1", "a1"), Round("u2", "a2"))]

    loaded = load_conversations([jsonl])
    assert [c.rounds for c in loaded] == expected
    assert [c.source for c in loaded] == [f"{jsonl}:1", f"{jsonl}:3"]
    for spec in (str(tmp_path / "d.parquet"), arrow, str(tmp_path / "saved")):
        assert [c.rounds for c in load_conversations([spec])] == expected


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "response": ', "invalid JSON"),
    ('["p", "r"]', "expected an object, got list"),
    ('{"prompt": "p"}', "missing field 'response'"),
    ('{"prompt": "p", "response": "  "}', "field 'response' is empty"),
    ('{"prompt": 3, "response": "r"}', "field 'prompt' must be a string, got int"),
    ('{"text": "p"}', "expected fields 'prompt' and 'response', or 'conversations'"),
    ('{"conversations": [{"role": "assistant", "content": "a"}]}',
     "field 'conversations[0].role' must be 'user'"),
    ('{"conversations": [{"role": "user", "content": "u"}]}', "must end with an assistant turn"),
    ('{"conversations": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]}',
     "field 'conversations[1].content' is empty"),
    ('{"conversations": []}', "field 'conversations' must be a non-empty list"),
    ('{"conversations": [{"role": "user", "content": "u"}], "prompt": "p"}',
     "has both 'conversations' and 'prompt'/'response'"),
])
def test_bad_records_raise_one_line_errors_naming_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "data.jsonl", ['{"prompt": "ok", "response": "ok"}', line])
    with pytest.raises(DataError) as error:
        load_conversations([path])
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_parquet_table_mixing_pairs_and_rankings_loads_both(tmp_path, monkeypatch):
    """In a table every row has every column (null where the shape lacks it): a null counts as absent."""
    import datasets

    from icegrt_jax.data.preferences import load_preferences

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    ranking = {"prompt": "q", "responses": ["a", "b", "c"], "rankings": [[2, 0, 1]], "chosen": None, "rejected": None}
    pair = {"prompt": "p", "responses": None, "rankings": None, "chosen": "good", "rejected": "bad"}
    datasets.Dataset.from_list([pair, ranking]).to_parquet(str(tmp_path / "mixed.parquet"))
    pairs, report = load_preferences([str(tmp_path / "mixed.parquet")], top_k=1, bottom_k=1)
    assert [(p.chosen, p.rejected) for p in pairs] == [("good", "bad"), ("c", "b")]
    assert report.pair_records == 1


@pytest.mark.parametrize("make", ["corrupt parquet", "corrupt arrow", "folder without data files"])
def test_unreadable_table_or_folder_is_a_one_line_error(tmp_path, make, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    if make == "folder without data files":
        path = tmp_path / "data"
        path.mkdir()
    else:
        path = tmp_path / ("t.parquet" if "parquet" in make else "t.arrow")
        path.write_bytes(b"not a table at all" * 10)
    with pytest.raises(DataError, match=f"^{path}: cannot read it as a dataset ") as error:
        load_conversations([str(path)])
    assert "\n" not in str(error.value)


def test_missing_data_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"^{missing}: no such file$"):
        load_conversations([missing])
    with pytest.raises(DataError, match="no such tokenizer directory"):
        load_tokenizer(str(tmp_path / "no_tokenizer"))


# --- batching -------------------------------------------------------------------------------

def test_buckets_bound_the_shapes_and_pad_minimally():
    rng = np.random.default_rng(0)
    buckets = bucket_lengths([8, 16, 32, 64, 100], max_length=48)
    assert buckets == (8, 16, 32, 48)
    examples = fake_examples(rng.integers(2, 49, size=203))
    for group_by_length in (True, False):
        iterator = BatchIterator(examples, batch_size=8, buckets=buckets, pad_id=-1, seed=0,
                                 group_by_length=group_by_length)
        shapes = set()
        for _ in range(2 * iterator.batches_per_epoch):
            batch = next(iterator)
            longest = batch["attention_mask"].sum(axis=1).max()
            assert batch["input_ids"].shape[1] == padded_length(longest, buckets)
            shapes.add(batch["input_ids"].shape)
        assert len(shapes) <= len(buckets) and {s[0] for s in shapes} == {8}


def test_an_epoch_counts_every_example_once():
    examples = fake_examples([3, 9, 4, 12, 5, 7, 6, 2, 11, 8, 10])  # 11 examples, batch 4
    for group_by_length in (True, False):
        plan = plan_epoch(np.array([len(e) for e in examples]), 4, (4, 8, 12),
                          np.random.default_rng(1), group_by_length)
        counted = np.concatenate([p.indices[:p.num_counted] for p in plan])
        assert sorted(counted) == list(range(11)) and len(plan) == 3
    batches = list(eval_batches(examples, batch_size=4, buckets=(4, 8, 12), pad_id=0))
    loss_tokens = sum(b["loss_mask"].sum() for b in batches)
    assert loss_tokens == sum(e.response_mask[1:].sum() for e in examples)
    assert all(b["input_ids"].shape[0] == 4 for b in batches)


def test_shuffling_is_deterministic_per_seed_and_resumes_exactly():
    examples = fake_examples(np.random.default_rng(2).integers(2, 30, size=37))
    settings = {"batch_size": 5, "buckets": (10, 20, 30), "pad_id": 0}

    def first_ids(iterator, n):
        return [next(iterator)["input_ids"][:, 0].tolist() for _ in range(n)]

    run = BatchIterator(examples, seed=3, **settings)
    assert run.batches_per_epoch == 8
    reference = first_ids(run, 20)  # two and a half epochs
    assert run.position == DataPosition(epoch=2, index=4)
    assert first_ids(BatchIterator(examples, seed=3, **settings), 20) == reference
    assert first_ids(BatchIterator(examples, seed=4, **settings), 20) != reference
    assert reference[:8] != reference[8:16]  # a new order each epoch

    interrupted = BatchIterator(examples, seed=3, **settings)
    first_ids(interrupted, 11)
    saved = dataclasses.asdict(interrupted.position)
    assert saved == {"epoch": 1, "index": 3}
    resumed = BatchIterator(examples, seed=3, position=DataPosition(**saved), **settings)
    assert first_ids(resumed, 9) == reference[11:]
    restored = BatchIterator(examples, seed=3, **settings)
    first_ids(restored, 2)  # a cached plan of another epoch must not leak into the resumed one
    restored.position = DataPosition(**saved)
    assert first_ids(restored, 9) == reference[11:]


def test_bad_batching_inputs_are_rejected():
    with pytest.raises(DataError, match="no examples"):
        BatchIterator([], batch_size=2, buckets=(8,), pad_id=0, seed=0)
    with pytest.raises(DataError, match="x:0: 9 tokens exceed the largest bucket 8"):
        BatchIterator(fake_examples([9]), batch_size=2, buckets=(8,), pad_id=0, seed=0)
    with pytest.raises(DataError, match="now 1 batches, the checkpoint was at batch index 1 of epoch 0"):
        BatchIterator(fake_examples([3]), batch_size=2, buckets=(8,), pad_id=0, seed=0,
                      position=DataPosition(0, 1))
    iterator = BatchIterator(fake_examples([3, 4, 5]), batch_size=2, buckets=(8,), pad_id=0, seed=0)
    with pytest.raises(DataError, match="is negative"):
        iterator.position = DataPosition(epoch=0, index=-1)


def test_resuming_past_the_end_of_shrunk_data_says_the_data_changed_and_what_to_do():
    iterator = BatchIterator(fake_examples([3, 4, 5]), batch_size=2, buckets=(8,), pad_id=0, seed=0)
    with pytest.raises(DataError) as error:
        iterator.position = DataPosition(epoch=5, index=2)  # saved by a run whose data had 3+ batches
    assert str(error.value) == (
        "the training data (or batch size) changed since the checkpoint: an epoch is now 2 batches, the "
        "checkpoint was at batch index 2 of epoch 5; resume with the run's data, or start a new run in a new "
        "training.output_dir")


def test_tokenising_and_eval_passes_show_progress_when_asked(tokenizer, capsys):
    quiet, _ = tokenize_conversations(CONVERSATIONS, tokenizer, ICEGRT, max_length=512, truncation="drop_example")
    assert capsys.readouterr().err == ""
    shown, _ = tokenize_conversations(CONVERSATIONS, tokenizer, ICEGRT, max_length=512, truncation="drop_example",
                                      progress=True)
    assert f"tokenize:   0%|          | 0/{len(CONVERSATIONS)}" in capsys.readouterr().err and len(shown) == len(quiet)
    batches = list(eval_batches(shown, batch_size=2, buckets=bucket_lengths([64, 128], 512), pad_id=0, progress=True))
    assert "eval:   0%|" in capsys.readouterr().err and len(batches) == 2
