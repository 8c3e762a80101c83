"""HF import/export: round trips, transformers loading our output, and clear errors on bad input."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import hf_logits, left_padded_batch, make_hf_llama

from icegrt_jax import cli
from icegrt_jax.checkpoint import load_model, load_model_dir, save_model
from icegrt_jax.hf import CheckpointError, load_hf, model_from_params, save_hf
from icegrt_jax.models.llama import ModelConfigError
from icegrt_jax.safetensors_io import SafetensorsError, SafetensorsFile


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_hf_llama(path, heads=4, kv_heads=2, tied=False)
    return path


def _leaves_equal_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("max_shard_size", [5 * 1024**3, 40_000])
def test_export_loads_in_transformers_and_roundtrips_bitwise(hf_dir, tmp_path, max_shard_size):
    cfg, params = load_hf(str(hf_dir))
    out = tmp_path / "export"
    save_hf(cfg, params, str(out), max_shard_size=max_shard_size)
    files = os.listdir(out)
    assert ("model.safetensors.index.json" in files) == (max_shard_size < 1e6)
    assert {"config.json", "generation_config.json"} <= set(files)

    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids, mask = left_padded_batch([7, 2], total=7, vocab=cfg.vocab_size, seed=3)
    ours, _ = model_from_params(cfg, params)(jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], hf_logits(reloaded, ids, mask)[valid], atol=1e-4, rtol=0)

    cfg2, params2 = load_hf(str(out))
    assert cfg2 == cfg
    _leaves_equal_bitwise(params, params2)


def test_bf16_checkpoint_keeps_dtype(tmp_path):
    src = tmp_path / "bf16"
    make_hf_llama(src, dtype=torch.bfloat16, tied=True)
    cfg, params = load_hf(str(src))
    assert cfg.param_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    save_hf(cfg, params, str(tmp_path / "out"))
    original = SafetensorsFile(str(src / "model.safetensors"))
    exported = SafetensorsFile(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(original.keys()) == sorted(exported.keys())
    for name in original:
        assert np.array_equal(original.get(name).view(np.uint16), exported.get(name).view(np.uint16)), name


def test_a_rope_base_other_than_the_default_survives_the_export(tmp_path):
    """transformers keeps rope_theta in rope_parameters: the exported model has the same base,
    so its logits equal the source's (a base read or written as 1e4 moves them by O(1))."""
    source = make_hf_llama(tmp_path / "src", rope_theta=1e6)
    cfg, params = load_hf(str(tmp_path / "src"))
    assert cfg.rope_theta == 1e6
    save_hf(cfg, params, str(tmp_path / "out"))
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = left_padded_batch([6, 3], total=6, vocab=cfg.vocab_size, seed=2)
    valid = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(exported, ids, mask)[valid], hf_logits(source, ids, mask)[valid],
                               atol=1e-5, rtol=0)


def test_project_checkpoint_roundtrip_and_cli_convert(hf_dir, tmp_path, capsys):
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "ours")]) == 0
    assert "has no tokenizer files and no --tokenizer was given" in capsys.readouterr().err  # said, not silent
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    cfg, params = load_hf(str(hf_dir))
    cfg_ours, params_ours = load_model(str(tmp_path / "ours"))
    assert cfg_ours == cfg
    _leaves_equal_bitwise(params, params_ours)
    _leaves_equal_bitwise(params, load_model_dir(str(tmp_path / "back"))[1])
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0
    cfg_half, params_half = load_model_dir(str(tmp_path / "half"))
    assert cfg_half.param_dtype == "bfloat16"
    _leaves_equal_bitwise(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), params_half)  # rounded once


def test_a_list_of_eos_ids_survives_both_conversions(tmp_path, capsys):
    make_hf_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, 7, 2, 9]}))
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, 11]}))
    cfg, _ = load_hf(str(tmp_path / "hf"))  # generation_config.json's ids count too (transformers stops there)
    assert (cfg.eos_token_id, cfg.extra_eos_token_ids, cfg.eos_token_ids) == (2, (7, 9, 11), (2, 7, 9, 11))
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert load_model(str(tmp_path / "ours"))[0] == cfg
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "back" / name).read_text())["eos_token_id"] == [2, 7, 9, 11]
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "back").eos_token_id == [2, 7, 9, 11]
    # one normal form, however the ids are given: the first is eos_token_id, no repeats
    assert cfg.replace(eos_token_id=None, extra_eos_token_ids=[7, 9, 7]) == cfg.replace(eos_token_id=7,
                                                                                        extra_eos_token_ids=(9,))
    assert cfg.replace(extra_eos_token_ids=None).eos_token_ids == (2,)


def test_reward_model_exports_as_sequence_classification_and_converts_back(hf_dir, tmp_path, capsys):
    """A ScoreModel (reward model / critic) saved as a project checkpoint converts to an HF
    LlamaForSequenceClassification whose score on right-padded rows (HF picks the last non-pad
    token) equals ours at the last real token (fp32, 1e-4), and converts back bitwise."""
    from icegrt_jax.models.heads import score_at_last_token, score_params_from_llama

    cfg, llama_params = load_hf(str(hf_dir))
    params = score_params_from_llama(llama_params, 5, cfg)
    save_model(cfg, params, str(tmp_path / "reward"), kind="score")
    assert cli.main(["convert", str(tmp_path / "reward"), str(tmp_path / "hf")]) == 0
    assert "LlamaForSequenceClassification" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "hf" / "generation_config.json")

    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded).__name__ == "LlamaForSequenceClassification" and reloaded.config.num_labels == 1
    assert reloaded.config.pad_token_id == cfg.pad_token_id == 0
    rng = np.random.default_rng(4)
    ids = np.zeros((3, 9), np.int64)  # right-padded with pad id 0; each row ends with EOS (2), as rollouts do
    mask = np.zeros((3, 9), np.int64)
    for row, n in enumerate((9, 4, 6)):
        ids[row, :n - 1], ids[row, n - 1], mask[row, :n] = rng.integers(3, cfg.vocab_size, n - 1), 2, 1
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    values = model_from_params(cfg, params, "score")(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(score_at_last_token(values, jnp.asarray(mask))), theirs, atol=1e-4)

    with pytest.raises(CheckpointError, match="holds a LlamaForSequenceClassification; a LlamaForCausalLM is expected"):
        load_model_dir(str(tmp_path / "hf"))  # e.g. a reward model given as the policy to sample from
    with pytest.raises(CheckpointError, match="holds a LlamaForCausalLM; a LlamaForSequenceClassification"):
        load_model_dir(str(hf_dir), kind="score")  # a policy given as the reward model
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    cfg_back, params_back = load_model(str(tmp_path / "back"))
    assert cfg_back == cfg
    _leaves_equal_bitwise(params, params_back)
    _leaves_equal_bitwise(params, load_hf(str(tmp_path / "hf"))[1])


def test_a_score_model_without_a_pad_token_exports_none_and_its_kind_follows_its_params(hf_dir, tiny_tokenizer_dir,
                                                                                        tmp_path, capsys):
    """LLaMA-1's pad id -1 names no token: transformers would score the last padding slot of a
    right-padded row, so the export names none (transformers then scores one row at a time)."""
    from icegrt_jax.models.heads import score_params_from_llama

    cfg, llama_params = load_hf(str(hf_dir))
    cfg = cfg.replace(pad_token_id=-1)
    params = score_params_from_llama(llama_params, 5, cfg)
    save_hf(cfg, params, str(tmp_path / "rm"))  # the kind from the parameters: a score head
    assert "note: no pad token id (no tokenizer given)" in capsys.readouterr().err
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] is None
    from icegrt_jax.data.tokenize import load_tokenizer, pad_token_id

    save_hf(cfg, params, str(tmp_path / "rm"), tokenizer=tiny_tokenizer_dir)  # the id the reward trainer pads with
    pad = pad_token_id(load_tokenizer(tiny_tokenizer_dir))
    assert pad >= 0 and json.loads((tmp_path / "rm" / "config.json").read_text())["pad_token_id"] == pad
    with pytest.raises(CheckpointError, match="kind 'causal_lm' does not match the parameters"):
        save_hf(cfg, params, str(tmp_path / "lm"), kind="causal_lm")
    assert not (tmp_path / "lm").exists()


def test_a_tied_checkpoint_that_also_stores_its_lm_head_loads_when_the_head_is_the_embedding(tmp_path):
    """As transformers loads it (it ignores the stored head); a different head is refused."""
    from icegrt_jax.safetensors_io import write_safetensors

    make_hf_llama(tmp_path / "tied", tied=True)
    file = tmp_path / "tied" / "model.safetensors"
    st = SafetensorsFile(str(file))
    tensors = {name: np.array(st.get(name)) for name in st}
    del st
    write_safetensors(str(file), {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]})
    cfg, params = load_hf(str(tmp_path / "tied"))
    assert cfg.tie_word_embeddings and np.array_equal(np.asarray(params["embed"][...]),
                                                      tensors["model.embed_tokens.weight"])
    write_safetensors(str(file), {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1})
    with pytest.raises(CheckpointError, match="unexpected tensors: lm_head.weight"):
        load_hf(str(tmp_path / "tied"))


def test_save_model_is_atomic_on_failure(hf_dir, tmp_path):
    cfg, params = load_hf(str(hf_dir))

    class Boom:
        def save_pretrained(self, directory):
            raise RuntimeError("tokenizer failed")

    with pytest.raises(RuntimeError, match="tokenizer failed"):
        save_model(cfg, params, str(tmp_path / "ckpt"), tokenizer=Boom())
    assert os.listdir(tmp_path) == []


def test_a_written_model_is_on_disk_before_and_after_its_rename(hf_dir, tiny_tokenizer_dir, tmp_path,
                                                                monkeypatch):
    """The write goes to a temporary directory renamed into place: every file in it (weights,
    configs, tokenizer) is fsynced first, and the parent directory after the rename, so a crash or
    power loss leaves the old directory or the complete new one."""
    from icegrt_jax.data.tokenize import load_tokenizer

    cfg, params = load_hf(str(hf_dir))
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    out = tmp_path / "out"
    save_hf(cfg, params, str(out), tokenizer=load_tokenizer(tiny_tokenizer_dir), max_shard_size=40_000)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    in_temporary = {p.split(".tmp-", 1)[1].partition("/")[2] for p in synced if p.startswith(f"{out}.tmp-")}
    assert len(written) > 12 and set(written) <= in_temporary  # synced where they were written
    assert synced[-1] == str(tmp_path)  # then the rename itself


def test_a_multi_process_write_is_on_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    """The multi-process write (every process into one shared temporary directory): once all have
    written (a barrier: no file changes while another process syncs), each process fsyncs the
    tree, and after a second barrier process 0 renames it and fsyncs the parent. Simulated in one
    process: process_count 2, barriers that pass."""

    from icegrt_jax import checkpoint, sharding

    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    monkeypatch.setattr(checkpoint.jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding, "gather_flags", lambda flag: synced.append("barrier") or np.array([flag, 0]))
    out = tmp_path / "model"

    def write(directory):
        os.makedirs(os.path.join(directory, "params"))
        for name in ("config.json", "params/shard-0"):
            with open(os.path.join(directory, name), "w") as f:
                f.write("x")

    checkpoint.write_directory(str(out), write)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["config.json", "params", "params/shard-0"]
    barriers = [i for i, entry in enumerate(synced) if entry == "barrier"]  # created, written, synced, moved
    assert len(barriers) == 4
    assert {f"{out}.tmp-shared/config.json", f"{out}.tmp-shared/params/shard-0"} <= set(
        synced[barriers[1]:barriers[2]])
    assert synced[barriers[2] + 1:] == [str(tmp_path), "barrier"]
    # A failure in one process's part stops it only at the barrier, where the others learn of it.
    synced.clear()
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_directory(str(tmp_path / "failing"), lambda directory: (_ for _ in ()).throw(OSError("disk full")))
    assert synced == ["barrier", "barrier"]  # created, then the write's barrier, which raises
    assert not (tmp_path / "failing").exists()


def test_convert_removes_what_a_killed_convert_left(hf_dir, tmp_path, caplog):
    """A convert killed mid-write leaves OUT.tmp-<host>-<pid>; the next write to OUT removes it
    when that pid is gone on this host, and keeps a live process's or another host's."""
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    left = {name: tmp_path / f"out.tmp-{name}" for name in (f"{host}-{dead}", f"{host}-{os.getppid()}",
                                                              f"other-host-{dead}")}
    for path in left.values():
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    assert cli.main(["convert", str(hf_dir), str(out)]) == 0
    assert [name for name, path in left.items() if path.exists()] == [f"{host}-{os.getppid()}", f"other-host-{dead}"]
    assert f"removed {left[f'{host}-{dead}']}, left by an interrupted earlier write of {out}" in caplog.text
    assert sorted(os.listdir(tmp_path)) == sorted(["out", *(path.name for path in list(left.values())[1:])])


def test_a_write_killed_between_its_two_renames_gets_the_old_model_back(hf_dir, tmp_path, caplog):
    """Replacing a model moves it to OUT.old-<host>-<pid>, then the new one in: killed between the
    two, OUT is missing; the next write to OUT (here the cleanup it starts with) puts the old model
    back, and when OUT is there again an orphaned old copy is removed."""
    from icegrt_jax.hf import remove_stale_temporaries

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    old = tmp_path / f"out.old-{socket.gethostname()}-{dead}"
    assert cli.main(["convert", str(hf_dir), str(out)]) == 0
    out.rename(old)
    remove_stale_temporaries(str(out))
    assert sorted(os.listdir(tmp_path)) == ["out"] and f"restored {out} from {old}" in caplog.text
    _leaves_equal_bitwise(load_hf(str(hf_dir))[1], load_model_dir(str(out))[1])
    shutil.copytree(out, old)
    assert cli.main(["convert", str(old), str(out), "--dtype", "bfloat16"]) == 2  # never SRC: the write removes it
    assert cli.main(["convert", str(hf_dir), str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out"] and f"removed {old}, the model an interrupted" in caplog.text
    out.rename(old)
    out.mkdir()  # e.g. a script's mkdir -p: an empty OUT is no model, the old one comes back
    remove_stale_temporaries(str(out))
    assert sorted(os.listdir(tmp_path)) == ["out"] and (out / "config.json").is_file()
    out.rename(old)
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # something else: both stay, and the log says where the model is
    remove_stale_temporaries(str(out))
    assert sorted(os.listdir(tmp_path)) == sorted(["out", old.name]) and "left in place" in caplog.text


def test_convert_refuses_out_equal_to_src_and_a_bad_shard_size(hf_dir, tmp_path, capsys):
    src = _copy(hf_dir, tmp_path)
    assert cli.main(["convert", src, src + "/"]) == 2
    assert "OUT is or contains SRC" in capsys.readouterr().err
    assert cli.main(["convert", src, str(tmp_path)]) == 2  # OUT holds SRC: replacing OUT would delete SRC
    assert "OUT is or contains SRC" in capsys.readouterr().err
    assert cli.main(["convert", src, str(tmp_path / "out"), "--max-shard-gb", "0"]) == 2
    assert "--max-shard-gb must be positive, got 0.0" in capsys.readouterr().err
    assert sorted(os.listdir(src)) == sorted(os.listdir(hf_dir)) and not (tmp_path / "out").exists()


def test_convert_to_a_place_it_cannot_write_is_one_line(hf_dir, capsys):
    assert cli.main(["convert", str(hf_dir), "/proc/converted"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("/proc/converted: cannot write (No such file or directory)")


def test_convert_of_a_run_directory_names_its_final_model(hf_dir, tmp_path, capsys):
    shutil.copytree(hf_dir, tmp_path / "run" / "final")
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert f"run: a training run, not a model; its trained model is {tmp_path / 'run' / 'final'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_project_checkpoint_with_missing_parameters_is_one_line(hf_dir, tmp_path, capsys):
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "ours")]) == 0
    shutil.rmtree(tmp_path / "ours" / "params")
    (tmp_path / "ours" / "params").mkdir()  # emptied: Orbax finds no parameters
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "params: cannot restore the parameters (" in err


def test_a_damaged_or_misdescribed_project_checkpoint_is_one_line_from_the_console(hf_dir, tmp_path, capsys):
    """Truncated array files: the reader's error, not Orbax's wrapper and the tracebacks of the
    reads it abandoned; a config.json whose sizes do not match the arrays: named before any read."""
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "ours")]) == 0
    damaged, misdescribed = tmp_path / "damaged", tmp_path / "misdescribed"
    shutil.copytree(tmp_path / "ours", damaged)
    shutil.copytree(tmp_path / "ours", misdescribed)
    for data in (damaged / "params").glob("ocdbt.process_*/d/*"):
        data.write_bytes(data.read_bytes()[:10])
    config = json.loads((misdescribed / "config.json").read_text())
    (misdescribed / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    for src, message in ((damaged, "params: cannot restore the parameters (OUT_OF_RANGE: Error reading "),
                         (misdescribed, "misdescribed: config.json does not describe the saved parameters (['layers']")):
        result = subprocess.run([sys.executable, "-m", "icegrt_jax.cli", "convert", str(src), str(tmp_path / "hf")],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 2 and message in result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert not (tmp_path / "hf").exists()


def test_convert_replaces_a_model_directory_but_never_another_directory(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["convert", str(hf_dir), str(out)]) == 0
    assert cli.main(["convert", str(hf_dir), str(out)]) == 0  # a model directory: replaced whole
    (out / "config.json").unlink()  # now just some directory with files in it
    capsys.readouterr()
    assert cli.main(["convert", str(hf_dir), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists and is not a model directory (no config.json)" in err
    assert (out / "params").is_dir()  # untouched
    (tmp_path / "file").write_text("x")
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


def test_convert_refuses_a_tokenizer_directory_without_tokenizer_files(hf_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "empty")]) == 2
    assert "no tokenizer files (expected one of tokenizer.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"model_max_length": 2048,')
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok")]) == 2
    assert "tokenizer_config.json:1: invalid JSON" in capsys.readouterr().err  # not copied to break later
    assert not (tmp_path / "out").exists()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer.json: not a tokenizer the tokenizers library can load" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "tok" / "tokenizer.json").unlink()
    assert cli.main(["convert", str(hf_dir), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == "{}"


# --- bad input ---------------------------------------------------------------------------------

def _copy(hf_dir, tmp_path) -> str:
    dst = tmp_path / "bad"
    shutil.copytree(hf_dir, dst)
    return str(dst)


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        data = json.load(f)
    data.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(data, f)


def _rewrite_tensors(path, edit):
    from icegrt_jax.safetensors_io import write_safetensors

    file = os.path.join(path, "model.safetensors")
    st = SafetensorsFile(file)
    tensors = {name: np.array(st.get(name)) for name in st}
    del st
    edit(tensors)
    write_safetensors(file, tensors)


def _truncate(path):
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 1000)


def _corrupt_header(path):
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe{{{")


def _bad_header_length(path):
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.write(struct.pack("<Q", 10**12))


BAD_INPUTS = {
    "missing config": (lambda p: os.remove(os.path.join(p, "config.json")), ModelConfigError, r"config\.json: not found"),
    "architecture": (lambda p: _edit_config(p, model_type="mistral", architectures=["MistralForCausalLM"]),
                     ModelConfigError, "unsupported architecture 'MistralForCausalLM'"),
    "missing tensor": (lambda p: _rewrite_tensors(p, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       CheckpointError, r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"),
    "unexpected tensor": (lambda p: _rewrite_tensors(p, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)})),
                          CheckpointError, r"unexpected tensors: model\.extra\.weight"),
    "shape": (lambda p: _rewrite_tensors(p, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)})),
              CheckpointError, r"model\.norm\.weight has shape \(65,\), expected \(64,\)"),
    "integer tensor": (lambda p: _rewrite_tensors(p, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)})),
                       CheckpointError, r"model\.norm\.weight is int32, expected a floating-point type"),
    "truncated": (_truncate, SafetensorsError, "truncated file"),
    "corrupted": (_corrupt_header, SafetensorsError, "corrupted header"),
    "header length": (_bad_header_length, SafetensorsError, "truncated or corrupted"),
    "no weights": (lambda p: os.remove(os.path.join(p, "model.safetensors")), CheckpointError,
                   "only safetensors weights are loaded"),
    "index weight_map": (lambda p: Path(p, "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
                         CheckpointError, r"index\.json: corrupted index \(expected a 'weight_map' object of file names\)"),
    "index not UTF-8": (lambda p: Path(p, "model.safetensors.index.json").write_bytes(b'{"weight_map": "\xff"}'),
                        CheckpointError, r"index\.json: not UTF-8 text"),
    "generation eos type": (lambda p: Path(p, "generation_config.json").write_text('{"eos_token_id": "x"}'),
                            CheckpointError, r"generation_config\.json: eos_token_id must be a token id or a list"),
    "generation not an object": (lambda p: Path(p, "generation_config.json").write_text("[2]"),
                                 CheckpointError, r"generation_config\.json: expected a JSON object, got list"),
    "config float type": (lambda p: _edit_config(p, rms_norm_eps="abc"), ModelConfigError,
                          r"config\.json: rms_norm_eps must be a positive number, got 'abc'"),
    "config null size": (lambda p: _edit_config(p, vocab_size=None), ModelConfigError,
                         "vocab_size must be a positive integer, got None"),
    "config float layers": (lambda p: _edit_config(p, num_hidden_layers=2.0), ModelConfigError,
                            "num_hidden_layers must be a positive integer, got 2.0"),
    "config null context": (lambda p: _edit_config(p, max_position_embeddings=None), ModelConfigError,
                            "max_position_embeddings must be a positive integer, got None"),
    "config eos type": (lambda p: _edit_config(p, eos_token_id="two"), ModelConfigError,
                        "eos_token_id must be a token id, a non-empty list of them or null, got 'two'"),
    "config rope type": (lambda p: _edit_config(p, rope_scaling="linear"), ModelConfigError,
                         "rope_scaling must be an object or null, got 'linear'"),
    "config architectures type": (lambda p: _edit_config(p, architectures=5), CheckpointError,
                                  r"config\.json: architectures must be a list of class names, got 5"),
    "config heads": (lambda p: _edit_config(p, num_key_value_heads=3), ModelConfigError,
                     r"config\.json: num_heads \d+ is not divisible by num_kv_heads 3"),
    "config rope factor without a type": (lambda p: _edit_config(p, rope_scaling={"factor": 2.0}), ModelConfigError,
                                          r"config\.json: unsupported rope_scaling \{'factor': 2\.0\}"),
    "index outside the directory": (
        lambda p: Path(p, "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": "../m.safetensors"}}'),
        CheckpointError, r"index\.json: weight_map names files outside the model directory: \.\./m\.safetensors"),
    "weights file is a directory": (lambda p: (os.remove(os.path.join(p, "model.safetensors")),
                                               os.mkdir(os.path.join(p, "model.safetensors"))),
                                    SafetensorsError, r"model\.safetensors: cannot read \(Is a directory\)"),
    "config is a directory": (lambda p: (os.remove(os.path.join(p, "config.json")), os.mkdir(os.path.join(p, "config.json"))),
                              ModelConfigError, r"config\.json: cannot read \(Is a directory\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_checkpoint_raises_clear_error_and_cli_exits_2(hf_dir, tmp_path, capsys, case):
    damage, error, message = BAD_INPUTS[case]
    src = _copy(hf_dir, tmp_path)
    damage(src)
    with pytest.raises(error, match=message):
        load_hf(src)
    capsys.readouterr()
    out = tmp_path / "converted"
    assert cli.main(["convert", src, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert not out.exists() and not any(p.name.startswith("converted") for p in tmp_path.iterdir())


def test_console_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "icegrt_jax.cli", "convert", str(tmp_path / "nope"), str(tmp_path / "o")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a directory" in result.stderr
