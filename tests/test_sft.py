"""ICE-Instruct SFT: learning, exact resume after SIGKILL, preemption, guards and bad input."""

import gc
import json
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_cli_killed_at

from icegrt_jax import cli
from icegrt_jax.checkpoint import TrainCheckpointer, load_model
from icegrt_jax.config import LoggingConfig, SFTConfig, TrainingConfig
from icegrt_jax.config_loader import load_config
from icegrt_jax.train.loop import NonFiniteError, drop_rows_after, train_loop
from icegrt_jax.train.sft import run_sft
from icegrt_jax.train.state import (
    accumulate_gradients,
    apply_gradients,
    init_train_state,
)

RECORDS = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "Write a short poem about the sea.", "response": "Waves roll in and out again."},
    {"conversations": [
        {"role": "user", "content": "Numbers: 1 2 3?"}, {"role": "assistant", "content": "4 5 6."},
        {"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "Jumps over the lazy dog."},
    ]},
    {"prompt": "Numbers: 7 8?", "response": "9 0 1 2."},
]


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


@pytest.fixture
def sft_setup(tmp_path, tiny_tokenizer_dir):
    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    write_jsonl(tmp_path / "eval.jsonl", RECORDS[:2])
    config = {
        "model": {"preset": "tiny", "vocab_size": 512, "hidden_size": 64, "num_layers": 2},
        "optimizer": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.1, "max_grad_norm": 1.0},
        "data": {"train_files": [str(tmp_path / "train.jsonl")], "eval_files": [str(tmp_path / "eval.jsonl")],
                 "tokenizer_path": tiny_tokenizer_dir, "max_length": 128, "batch_size": 4,
                 "bucket_boundaries": [64, 128]},
        "training": {"steps": 12, "seed": 0, "eval_every": 6, "save_every": 3, "keep_checkpoints": 2,
                     "output_dir": str(tmp_path / "run"), "log_every": 1},
        "logging": {"progress": False},  # TensorBoard on by default: test_tiny_model_overfits checks its events
    }
    path = tmp_path / "sft.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return tmp_path, str(path)


def test_tiny_model_overfits_small_batch(sft_setup):
    tmp_path, config = sft_setup
    cfg = load_config(SFTConfig, config, ["training.steps=80", "training.save_every=80", "optimizer.lr=1e-2",
                                          "optimizer.warmup_steps=5"])
    metrics = run_sft(cfg)
    assert metrics["loss"] < 0.05
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in lines if "loss" in m)
    assert first["loss"] > 2.0
    assert any("eval/loss" in m for m in lines)
    documented = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    assert {key for m in lines for key in m if key != "step" and f"`{key}`" not in documented} == set()
    assert os.listdir(tmp_path / "run" / "tensorboard")
    assert os.path.isdir(tmp_path / "run" / "final" / "params")
    assert (tmp_path / "run" / "data_report.txt").read_text().startswith("train data: ")  # the counts, kept


def test_training_holds_no_second_copy_of_the_model(sft_setup, monkeypatch):
    """While the loop runs, the only parameter-sized arrays alive are the state's: the initial
    params it was built from are gone (they would hold a model's worth of device memory)."""
    from icegrt_jax.train import sft

    seen = {}

    def spy(*, state, **kwargs):
        gc.collect()
        shapes = {x.shape for x in jax.tree.leaves(state.params) if x.size > 1}
        held = {id(x) for x in jax.tree.leaves(state)}
        seen["others"] = [x.shape for x in jax.live_arrays() if x.shape in shapes and id(x) not in held]
        return train_loop(state=state, **kwargs)

    monkeypatch.setattr(sft, "train_loop", spy)
    run_sft(load_config(SFTConfig, sft_setup[1], ["training.steps=1"]))
    assert seen["others"] == []


def run_killed(config, output_dir, kill_at, sig, *overrides):
    return run_cli_killed_at("icegrt_jax.train.sft", kill_at + 1, sig,
                             ["sft", "--config", config, f"training.output_dir={output_dir}", *overrides])


def _params(path):
    return jax.tree.leaves(load_model(str(path))[1])


def test_exact_resume_after_sigkill(sft_setup):
    tmp_path, config = sft_setup
    one_a_batch = "data.batch_size=1"  # 4 batches an epoch: the checkpoints at steps 3 and 6 are mid-epoch
    assert cli.main(["sft", "--config", config, f"training.output_dir={tmp_path / 'straight'}", one_a_batch]) == 0

    killed = run_killed(config, tmp_path / "resumed", 7, "SIGKILL", one_a_batch)
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "resumed" / "final")
    # The save at step 6 is asynchronous: SIGKILL may land before it commits, never half-way.
    checkpoints = TrainCheckpointer(str(tmp_path / "resumed" / "checkpoints"))
    assert checkpoints.latest_step() in (3, 6)
    position = {3: {"epoch": 0, "index": 3}, 6: {"epoch": 1, "index": 2}}[checkpoints.latest_step()]
    meta = json.loads((tmp_path / "resumed" / "checkpoints" / str(checkpoints.latest_step()) / "meta" / "metadata").read_text())
    assert meta["data_position"] == position
    assert cli.main(["sft", "--config", config, f"training.output_dir={tmp_path / 'resumed'}", one_a_batch]) == 0

    for a, b in zip(_params(tmp_path / "straight" / "final"), _params(tmp_path / "resumed" / "final"), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # The log reads as if uninterrupted: each step once (rows after the checkpoint are dropped on resume).
    straight, resumed = (_logged(tmp_path / name) for name in ("straight", "resumed"))
    assert [step for step, _ in resumed] == [step for step, _ in straight]
    assert resumed == straight


def test_resume_names_a_changed_config_and_refuses_a_state_that_no_longer_fits(sft_setup, capsys):
    tmp_path, config = sft_setup
    run = ["sft", "--config", config, f"training.output_dir={tmp_path / 'run'}"]
    assert cli.main([*run, "training.steps=3"]) == 0
    capsys.readouterr()
    assert cli.main([*run, "training.steps=3", "optimizer.lr=1e-3"]) == 0  # resumes at its last step
    out = capsys.readouterr().out
    assert "[sft] resumed from step 3" in out
    assert "[sft] done: no step left to run (training.steps reached); see metrics.jsonl" in out  # not an empty summary
    assert "[sft] note: resuming with a config that differs from the run's: optimizer.lr: 0.003 -> 0.001\n" in out
    assert "lr: 0.003" in (tmp_path / "run" / "config.until-step-3.yaml").read_text()  # what steps 1-3 ran on
    assert "lr: 0.001" in (tmp_path / "run" / "config.yaml").read_text()
    assert cli.main([*run, "training.steps=5", "optimizer.lr=1e-3", "model.hidden_size=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step 3 does not fit this run's model and optimizer state" in err
    assert "(config changed: model.hidden_size: 64 -> 32; training.steps: 3 -> 5)" in err
    assert "hidden_size: 64" in (tmp_path / "run" / "config.yaml").read_text()  # the run's config is kept
    (tmp_path / "run" / "config.yaml").unlink()  # nothing to compare the config with: the arrays are named
    assert cli.main([*run, "model.hidden_size=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(saved arrays not in this run: [2, 4, 16, 64], " in err
    assert "this run's not saved: [2, 4, 8, 32], [2, 32])" in err
    assert cli.main([*run, "optimizer.max_grad_norm=null"]) == 2  # the same shapes in another optimizer tree
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step 3 does not fit this run's model and optimizer state (opt_state: " in err


def test_a_longer_rerun_says_the_schedule_is_recomputed_and_a_shorter_one_is_refused(sft_setup, capsys):
    tmp_path, config = sft_setup
    run = ["sft", "--config", config, f"training.output_dir={tmp_path / 'run'}"]
    assert cli.main([*run, "training.steps=2"]) == 0
    capsys.readouterr()
    assert cli.main([*run, "training.steps=3"]) == 0
    assert ("[sft] note: the learning-rate schedules are recomputed for the new number of steps: from step 2 "
            "on the rates follow them") in capsys.readouterr().out
    assert cli.main([*run, "training.steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the run is at step 3, past the 2 steps this config gives" in err
    write_jsonl(tmp_path / "train.jsonl", RECORDS[:-1])  # the data changed since
    assert cli.main([*run, "training.steps=4"]) == 0
    out = capsys.readouterr().out
    assert f"[sft] note: the training data differ from the run's (now {len(RECORDS) - 1} examples, CRC-32 " in out
    assert f", was {len(RECORDS)} examples, CRC-32 " in out
    assert cli.main([*run, "training.steps=5"]) == 0 and "training data differ" not in capsys.readouterr().out


def test_a_final_directory_that_is_not_a_model_is_refused_before_training(sft_setup, capsys):
    tmp_path, config = sft_setup
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "notes.txt").write_text("mine")
    assert cli.main(["sft", "--config", config, f"training.output_dir={tmp_path / 'run'}"]) == 2
    assert "final: exists and is not a model directory (no config.json)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists() and (tmp_path / "run" / "final" / "notes.txt").exists()


def _logged(run_dir):
    """(step, loss or eval loss) of each metrics.jsonl row."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("eval/loss"))) for r in rows]


def test_sigterm_saves_a_checkpoint_and_exits_as_stopped(sft_setup):
    tmp_path, config = sft_setup
    result = run_killed(config, tmp_path / "preempted", kill_at=4, sig="SIGTERM")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr  # not finished: as killed by it, for schedulers
    assert f"icegrt sft: stopped by SIGTERM at step 5; checkpoint saved in {tmp_path / 'preempted' / 'checkpoints'}" \
        in result.stderr
    assert TrainCheckpointer(str(tmp_path / "preempted" / "checkpoints")).latest_step() == 5
    assert not os.path.exists(tmp_path / "preempted" / "final")


def test_gradient_accumulation_is_exact():
    """Micro-batches of unequal token counts: grad(sum NLL / total tokens) whatever the split."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    weights = jnp.asarray(rng.integers(0, 2, size=(4, 6)), jnp.float32).at[0].set(1.0)
    params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}

    def sum_loss(p, batch):
        per_token = (batch["x"] @ p["w"]) ** 2
        return jnp.sum(per_token * batch["m"]), (jnp.sum(batch["m"]), {})

    def mean_loss(p):
        return jnp.sum(((x @ p["w"]) ** 2) * weights) / jnp.sum(weights)

    for accum in (1, 2, 4):
        micro = {"x": x.reshape(accum, 4 // accum, 6, 3), "m": weights.reshape(accum, 4 // accum, 6)}
        grads, loss, total, _ = accumulate_gradients(sum_loss, params, micro)
        np.testing.assert_allclose(grads["w"], jax.grad(mean_loss)(params)["w"], rtol=1e-5)
        np.testing.assert_allclose(loss, mean_loss(params), rtol=1e-6)
        assert float(total) == float(weights.sum())


def test_gradients_of_bf16_parameters_accumulate_in_fp32():
    """Summed in bf16, 32 micro-batches' gradients drifted ~9x a single bf16 rounding from the
    fp32 full-batch gradient; summed in fp32, within 2x."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(64, 8, 16)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16)}

    def sum_loss(p, batch):
        return jnp.sum((batch["x"] @ p["w"].astype(jnp.float32)) ** 2), (jnp.float32(batch["x"].shape[0] * 8), {})

    exact = jax.grad(lambda w: jnp.mean((x @ w) ** 2))(params["w"].astype(jnp.float32))
    one, *_ = accumulate_gradients(sum_loss, params, {"x": x[None]})
    grads, *_ = accumulate_gradients(sum_loss, params, {"x": x.reshape(32, 2, 8, 16)})
    assert grads["w"].dtype == one["w"].dtype == jnp.float32  # the means, as one micro-batch's
    single_rounding = float(jnp.max(jnp.abs(one["w"] - exact)))
    assert float(jnp.max(jnp.abs(grads["w"] - exact))) <= 2 * single_rounding


def test_a_quick_resume_keeps_the_earlier_runs_tensorboard_events(tmp_path, monkeypatch):
    """tensorboardX names event files by the second (``time.time()`` when the writer starts): a
    resume in the same second had overwritten them. Both writers start at the same clock here."""
    from icegrt_jax.train.loop import MetricsLogger

    for start in (0, 1):
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda: 1700000000.5)
            logger = MetricsLogger(str(tmp_path), LoggingConfig(tensorboard=True), resume_step=start)
        logger.log(start + 1, {"loss": 1.0})
        logger.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.1700000000.*"))) == 2


def test_non_finite_update_is_skipped_and_loop_stops(tmp_path):
    params = {"w": jnp.ones(3)}
    tx = optax.adam(0.1)
    state = init_train_state(params, tx, 0)
    skipped, metrics = apply_gradients(state, {"w": jnp.array([1.0, jnp.nan, 0.0])}, jnp.float32(1.0), tx)
    assert metrics["finite"] == 0 and int(skipped.step) == 0
    np.testing.assert_array_equal(skipped.params["w"], params["w"])

    def step_fn(state, batch):
        grads = {"w": jnp.full(3, batch)}
        return apply_gradients(state, grads, jnp.sum(grads["w"]), tx)[0], {"loss": jnp.sum(grads["w"]),
                                                                           "finite": jnp.isfinite(batch) * 1.0}

    checkpointer = TrainCheckpointer(str(tmp_path / "ckpt"), keep=3, async_save=False)
    with pytest.raises(NonFiniteError, match="step 3: non-finite.*last good checkpoint: step 2"):
        train_loop(state=state, step_fn=step_fn, batches=iter([1.0, 2.0, np.nan, 4.0]), total_steps=4,
                   checkpointer=checkpointer, meta_fn=dict, training=TrainingConfig(save_every=1, log_every=1),
                   logging=LoggingConfig(progress=False), output_dir=str(tmp_path))
    assert checkpointer.latest_step() == 2


def test_an_update_holds_no_second_copy_of_the_state():
    """The skip of a non-finite update is a ``lax.cond``: the donated state is updated in place
    (a select of new and old states kept both: 8 MiB of temporaries here, params + Adam moments)."""
    params = {"w": jnp.ones((1024, 1024)), "b": jnp.ones(1024)}
    tx = optax.adamw(1e-3)
    update = jax.jit(lambda state, grads: apply_gradients(state, grads, jnp.float32(1.0), tx), donate_argnums=0)
    memory = update.lower(init_train_state(params, tx, 0), params).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 2**20, memory.temp_size_in_bytes  # measured: 4 KiB


def test_an_update_keeps_every_state_dtype():
    """bf16 parameters' Adam moments stay bf16 under fp32 gradients (as initialised and as
    ``icegrt plan`` counts them), whether the update is applied or skipped."""
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    tx = optax.adamw(1e-3)
    state = init_train_state(params, tx, 0)
    for loss in (1.0, float("nan")):
        updated, _ = apply_gradients(state, {"w": jnp.ones(4, jnp.float32)}, jnp.float32(loss), tx)
        assert jax.tree.map(lambda x: x.dtype, updated) == jax.tree.map(lambda x: x.dtype, state)


def test_a_logging_failure_on_process_0_stops_every_process_at_the_step_boundary(tmp_path, monkeypatch):
    """Only process 0 writes metrics; when that fails (a full disk), it first meets the others in
    a collective that tells them (they raise too) instead of leaving them in the next step's
    collectives. Simulated: the processes' flags as one process sees them."""
    from icegrt_jax import sharding
    from icegrt_jax.train import loop

    gathered = []
    monkeypatch.setattr(sharding, "gather_flags", lambda flag: gathered.append(flag) or np.array([flag, 0]))
    monkeypatch.setattr(loop.MetricsLogger, "log", lambda self, step, metrics: (_ for _ in ()).throw(OSError("disk full")))
    state = init_train_state({"w": jnp.ones(3)}, optax.sgd(0.1), 0)
    checkpointer = TrainCheckpointer(str(tmp_path / "ckpt"), keep=1, async_save=False)
    with pytest.raises(OSError, match="disk full"):
        train_loop(state=state, step_fn=lambda s, b: (s, {"loss": jnp.float32(b)}), batches=iter([1.0, 2.0]),
                   total_steps=2, checkpointer=checkpointer, meta_fn=dict, training=TrainingConfig(log_every=1),
                   logging=LoggingConfig(progress=False), output_dir=str(tmp_path))
    assert gathered == [0, 1]  # the logs opened (agreed), then the failure was shared before it was raised


def test_a_directory_with_only_a_users_config_yaml_is_not_a_run_directory(sft_setup, capsys):
    tmp_path, config = sft_setup
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "config.yaml").write_text("# my notes\n")
    assert cli.main(["sft", "--config", config, f"training.output_dir={tmp_path / 'exp'}"]) == 2
    assert "exp: not empty and not a run directory (no checkpoints/)" in capsys.readouterr().err
    assert (tmp_path / "exp" / "config.yaml").read_text() == "# my notes\n"


def test_a_diverged_run_is_one_line_and_exit_1(sft_setup, capsys, monkeypatch):
    _, config = sft_setup

    def diverge(cfg):
        raise NonFiniteError("step 3: non-finite loss or gradient (loss=nan, grad_norm=nan); last good checkpoint: "
                             "step 2 in run/checkpoints")

    monkeypatch.setattr("icegrt_jax.train.sft.run_sft", diverge)
    assert cli.main(["sft", "--config", config]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("icegrt sft: error: step 3: non-finite loss") and len(err.splitlines()) == 1


BAD_DATA = {
    "malformed line": ('{"prompt": "a", "response": "b"}\n{"prompt": "c",\n', r"train\.jsonl:2"),
    "missing field": ('{"prompt": "a"}\n', r"error: /.*/train\.jsonl:1: missing field 'response'$"),
    "empty response": ('{"prompt": "a", "response": ""}\n', r"error: /.*/train\.jsonl:1: field 'response' is empty$"),
    "empty file": ("", r"data.train_files .*train\.jsonl: no training examples \(the files are empty\)"),
    "every example too long": ('{"prompt": "a", "response": "' + "waves " * 200 + '"}\n',
                               r"no training examples \(1 examples \(max_length 128\): .* 1 dropped as too long .*; "
                               + r"each starts with the template's \d+ preamble"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_exit_2_nothing_written(sft_setup, capsys, case):
    tmp_path, config = sft_setup
    text, message = BAD_DATA[case]
    (tmp_path / "train.jsonl").write_text(text)
    assert cli.main(["sft", "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(message, err)
    assert not (tmp_path / "run").exists()


def test_an_empty_eval_file_is_one_line_exit_2(sft_setup, capsys):
    """Not an evaluation of nothing, which would log a loss of 0."""
    tmp_path, config = sft_setup
    (tmp_path / "eval.jsonl").write_text("\n")
    assert cli.main(["sft", "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("eval.jsonl: no evaluation examples (the files are empty)") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", "optimizer.lrr"),
    ("training.steps=abc", "training.steps"),
    ("data.train_files=[/nonexistent/x.jsonl]", "/nonexistent/x.jsonl"),
    ("training.output_dir={tmp}/train.jsonl",
     "train.jsonl: exists and is not a directory; choose another training.output_dir"),
    ("training.output_dir={tmp}", "not empty and not a run directory (no checkpoints/)"),
    ("model.preset=null model.hf_path={tmp}/nope", "model.hf_path: {tmp}/nope: no such directory"),
    ("optimizer.lr=.nan", "optimizer.lr: must be a finite number, got nan"),
])
def test_bad_config_is_one_line_exit_2_nothing_written(sft_setup, capsys, override, message):
    tmp_path, config = sft_setup
    assert cli.main(["sft", "--config", config, *override.format(tmp=tmp_path).split()]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(tmp=tmp_path) in err
    assert not (tmp_path / "run").exists()


def test_resuming_keeps_the_metrics_rows_up_to_the_checkpoint_and_counts_unreadable_ones(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text(f"{rows[0]}\nnot json\n{rows[1]}\n{rows[2]}\n{{\"step\": 4, \"lo")  # torn last line
    drop_rows_after(str(path), 2)
    assert path.read_text() == f"{rows[0]}\n{rows[1]}\n"
    assert capsys.readouterr().err.strip().endswith("metrics.jsonl: dropped 1 line(s) that are not JSON objects")
    drop_rows_after(str(path), 2)  # a clean file: nothing to say
    assert capsys.readouterr().err == ""


def test_a_model_fine_tuned_from_an_hf_directory_keeps_its_generation_defaults(sft_setup):
    """final/ carries the source's generation_config.json sampling defaults (with the model's ids),
    which an export writes back."""
    from helpers import make_hf_llama

    from icegrt_jax.hf import read_generation_config

    tmp_path, config = sft_setup
    make_hf_llama(tmp_path / "base", vocab=512)
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}))
    run_sft(load_config(SFTConfig, config, ["model.preset=null", f"model.hf_path={tmp_path / 'base'}",
                                            "model.vocab_size=null", "model.hidden_size=null", "model.num_layers=null",
                                            "training.steps=1"]))
    carried = read_generation_config(str(tmp_path / "run" / "final"))
    assert {k: carried[k] for k in ("do_sample", "temperature", "top_p", "eos_token_id")} == {
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}
