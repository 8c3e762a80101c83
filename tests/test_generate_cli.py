"""``icegrt generate``: template, tokenizer, samples per prompt, output format and input errors."""

import json

import numpy as np
import pytest
from helpers import make_hf_llama

from icegrt_jax import cli
from icegrt_jax.data.templates import ICEGRT
from icegrt_jax.data.tokenize import load_tokenizer, tokenize_prompt
from icegrt_jax.hf import load_hf, model_from_params
from icegrt_jax.sampling import SamplingParams, generate

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea at the Café de Flore."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A random tiny HF LLaMA whose vocabulary is the tiny tokenizer's, saved with it."""
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    path = tmp_path_factory.mktemp("generate_model")
    make_hf_llama(path, vocab=len(tokenizer))
    tokenizer.save_pretrained(path)
    return str(path)


def run_cli(*argv):
    return cli.main(["generate", *map(str, argv)])


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_generate_file_with_template_and_samples(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out.jsonl"
    assert run_cli("--model", model_dir, "--prompts", prompts, "--out", out, "--num-samples", 3,
                   "--max-new-tokens", 6, "--temperature", 0.9, "--top-p", 0.95, "--batch-size", 1) == 0
    records = read_jsonl(out)
    assert [(r["id"], r["prompt"]) for r in records] == list(enumerate(PROMPTS))
    assert "Café" in out.read_text(encoding="utf-8")  # UTF-8 as is, not \u escapes
    for record in records:
        assert len(record["responses"]) == 3
        for response in record["responses"]:
            assert 1 <= response["num_tokens"] <= 6 and isinstance(response["text"], str)
            assert response["finished_by_eos"] or response["num_tokens"] == 6
            assert response["logprob"] <= 0
    cut = sum(not r["finished_by_eos"] for record in records for r in record["responses"])
    assert cut > 0 and f"{cut} of {3 * len(PROMPTS)} responses ended at the length limit" in capsys.readouterr().err


def test_greedy_text_equals_the_library_on_the_templated_prompt(model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run_cli("--model", model_dir, "--prompt", PROMPTS[0], "--out", out, "--greedy",
                   "--max-new-tokens", 6) == 0
    [record] = read_jsonl(out)

    tokenizer = load_tokenizer(model_dir)
    ids = tokenize_prompt(tokenizer, ICEGRT, PROMPTS[0])
    assert tokenizer.decode(ids).startswith("<s>Below is an instruction")
    assert tokenizer.decode(ids).endswith("### USER: " + PROMPTS[0] + " ASSISTANT:")
    cfg, params = load_hf(model_dir)
    result = generate(model_from_params(cfg, params), [ids],
                      SamplingParams(greedy=True, max_new_tokens=6, eos_token_ids=(tokenizer.eos_token_id,)))
    tokens = result.response_tokens(0)
    if result.finished_by_eos[0]:
        tokens = tokens[:-1]
    [response] = record["responses"]
    # the text as SFT/reward data holds a response: the template's separator (" ") the model emits
    # first is the template's, not the response's, so the file can be ranked and trained on as it is
    assert response["text"] == tokenizer.decode(tokens.tolist(), skip_special_tokens=True).removeprefix(" ")
    assert response["num_tokens"] == int(result.lengths[0])
    np.testing.assert_allclose(response["logprob"], result.logprobs[0].sum(), rtol=1e-5)


def test_a_response_loses_the_separator_of_either_template(model_dir):
    from icegrt_jax.data.templates import RAW
    from icegrt_jax.data.tokenize import decode_response

    tokenizer = load_tokenizer(model_dir)
    ids = np.array(tokenizer.encode(" waves roll", add_special_tokens=False) + [tokenizer.eos_token_id])
    for template in (ICEGRT, RAW):  # --no-template prompts were trained with the raw template's " "
        assert decode_response(tokenizer, template, ids, ended=True) == "waves roll"
        assert decode_response(tokenizer, template, ids[:-1], ended=False) == "waves roll"
    newline = np.array(tokenizer.encode(" waves roll\n", add_special_tokens=False))  # a stop token that is text
    assert decode_response(tokenizer, ICEGRT, newline, ended=True) == "waves roll"


def test_a_raw_prompt_is_bos_and_its_text_tokenised_as_in_training(model_dir):
    """--no-template: BOS + the text, where special-token text (a literal "</s>") stays text."""
    from icegrt_jax.commands.generate import _encode

    tokenizer = load_tokenizer(model_dir)
    ids = [int(i) for i in _encode(tokenizer, None, "waves </s> roll")]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids[1:]) == "waves </s> roll"


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be"),
    (["--prompts", "{bad}"], "missing field 'prompt'"),
    (["--prompts", "{empty}"], "no prompts"),
    (["--prompt", "x" * 2000], "--prompt number 1: the prompt has"),
    (["--prompts", "{long}"], "long.jsonl:3: the prompt has"),  # the file's line, blank lines counted
    (["--prompts", "{answered}"], "answered.jsonl:1: the record already has a 'responses' field"),
    (["--out", "{folder}"], "is a directory; give the path of the JSONL file to write"),
    (["--out", "/proc/out.jsonl"], "/proc/out.jsonl: cannot write ("),  # said before the model loads
    (["--tokenizer", "{folder}"], "; the directory needs tokenizer files (tokenizer.json"),
    (["--model", "{folder}/nowhere"], "/nowhere: no such model directory"),  # the last --model counts
    (["--model", "{run}"], "run: a training run, not a model; its trained model is "),
    (["--greedy", "--temperature", "0.7", "--top-k", "5"], "--greedy decodes by argmax and ignores --temperature, --top-k"),
    (["--temperature", "0", "--num-samples", "3"], "greedy decoding (--temperature 0) gives 3 identical responses"),
])
def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys, argv, message):
    bad, empty = tmp_path / "bad.jsonl", tmp_path / "empty.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    empty.write_text("\n")
    (tmp_path / "long.jsonl").write_text('{"prompt": "fine"}\n\n' + json.dumps({"prompt": "x" * 2000}) + "\n")
    (tmp_path / "answered.jsonl").write_text('{"prompt": "fine", "responses": []}\n')
    (tmp_path / "folder").mkdir()
    (tmp_path / "run" / "final").mkdir(parents=True)
    argv = [a.format(bad=bad, empty=empty, long=tmp_path / "long.jsonl", answered=tmp_path / "answered.jsonl",
                     folder=tmp_path / "folder", run=tmp_path / "run") for a in argv]
    if "--prompts" not in argv and "--prompt" not in argv:
        argv += ["--prompt", "hello"]
    assert run_cli("--model", model_dir, "--out", tmp_path / "out.jsonl", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("icegrt generate: error:") and len(err.splitlines()) == 1
    if message.startswith("missing"):
        assert f"{bad}:2" in err


def test_sample_writes_the_annotation_file_that_becomes_ranking_data(model_dir, tmp_path):
    from icegrt_jax.data.preferences import load_preferences

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id" if i else "prompt_id": f"p{i}", "prompt": p, "topic": i}) + "\n"
                               for i, p in enumerate(PROMPTS)))  # prompt_id or id; other fields kept
    out = tmp_path / "annotate.jsonl"
    assert cli.main(["sample", "--model", model_dir, "--prompts", str(prompts), "--n", "5", "--out", str(out),
                     "--max-new-tokens", "6", "--seed", "3"]) == 0
    records = read_jsonl(out)
    assert [(r["prompt_id"], r["prompt"], r["topic"]) for r in records] == [("p0", PROMPTS[0], 0), ("p1", PROMPTS[1], 1)]
    assert all(len(r["responses"]) == 5 for r in records)
    assert records[0]["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 6,
                                      "seed": 3, "model": model_dir}
    # the same samples as `generate`, in a seeded random order
    plain = tmp_path / "plain.jsonl"
    assert run_cli("--model", model_dir, "--prompts", prompts, "--out", plain, "--num-samples", 5,
                   "--max-new-tokens", 6, "--seed", 3) == 0
    for shuffled, ordered in zip(records, read_jsonl(plain)):
        assert sorted(shuffled["responses"]) == sorted(r["text"] for r in ordered["responses"])
        cut = {r["text"]: not r["finished_by_eos"] for r in ordered["responses"]}  # each flag goes with its text
        assert [cut[text] for text in shuffled["responses"]] == shuffled["truncated"]
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("".join(json.dumps({**r, "rankings": [[0, 1, 2, 3, 4]] * 3}) + "\n" for r in records))
    pairs, report = load_preferences([str(ranked)])
    assert report.ranking_records == 2 and len(pairs) + report.identical_pairs_dropped == 8


def test_a_corrupt_parquet_file_is_one_line_on_stderr(model_dir, tmp_path, capfd):
    """datasets logs its own failure to stderr too; the user sees our one line only."""
    (tmp_path / "prompts.parquet").write_bytes(b"garbage")
    assert run_cli("--model", model_dir, "--prompts", tmp_path / "prompts.parquet", "--out", tmp_path / "o.jsonl") == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("icegrt generate: error:") and "cannot read it as a dataset" in err
    assert len(err.splitlines()) == 1, err
