"""The shared training loop's metrics rows: interval means, the row a signal flushes, the final
eval handed back, the non-finite message; and the tokens the trainers count for tokens/s."""

import json
import signal

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from icegrt_jax.checkpoint import TrainCheckpointer
from icegrt_jax.config import LoggingConfig, TrainingConfig
from icegrt_jax.data.batching import collate
from icegrt_jax.data.tokenize import TokenizedExample
from icegrt_jax.errors import NonFiniteError
from icegrt_jax.train import loop
from icegrt_jax.train.sft import counted_tokens
from icegrt_jax.train.state import init_train_state


def test_interval_means_average_each_metric_over_the_steps_that_report_it():
    rows = [{"loss": 1.0, "step_time_s": 1.0, "tokens": 10}, {"value_loss": 4.0, "step_time_s": 3.0, "tokens": 30},
            {"loss": 3.0, "value_loss": 2.0, "step_time_s": 1.0, "tokens": 60}]
    means = loop.interval_means(rows)
    assert means == {"loss": 2.0, "step_time_s": 5 / 3, "value_loss": 3.0, "tokens_per_s": 100 / 5}


def test_extremes_and_rates_are_those_of_the_interval():
    rows = [{"response_length_min": 3.0, "response_length_max": 9.0, "generated_tokens": 100.0, "time_generate_s": 1.0},
            {"response_length_min": 1.0, "response_length_max": 5.0, "generated_tokens": 10.0, "time_generate_s": 10.0}]
    assert loop.interval_means(rows) == {"response_length_min": 1.0, "response_length_max": 9.0,
                                         "generate_tokens_per_s": 10.0, "time_generate_s": 5.5}


def _run(tmp_path, values, total_steps, log_every, *, stop_at=None, eval_fn=None, save_every=1000, start=0,
         crash_at=None):
    """train_loop from step ``start`` over scalar batches ``values`` (the step's loss); SIGTERM to
    itself at step ``stop_at``; a crash (an exception) at step ``crash_at``."""
    def step_fn(state, batch):
        if state.step + 1 == stop_at:
            signal.raise_signal(signal.SIGTERM)
        if state.step + 1 == crash_at:
            raise RuntimeError("crash")
        return state.replace(step=state.step + 1), {"loss": jnp.float32(batch), "finite": jnp.isfinite(batch) * 1.0}

    state = init_train_state({"w": jnp.ones(2)}, optax.sgd(0.1), 0).replace(step=jnp.int32(start))
    checkpointer = TrainCheckpointer(str(tmp_path / "ckpt"), keep=1, async_save=False)
    result = loop.train_loop(state=state, step_fn=step_fn, batches=iter(values), total_steps=total_steps,
                             checkpointer=checkpointer, meta_fn=dict, training=TrainingConfig(log_every=log_every, save_every=save_every),
                             logging=LoggingConfig(progress=False, tensorboard=False), output_dir=str(tmp_path),
                             eval_fn=eval_fn, tokens_fn=lambda batch: 4)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def test_each_row_is_the_mean_of_the_steps_since_the_last_one(tmp_path):
    result, rows = _run(tmp_path, [1.0, 2.0, 6.0, 4.0, 5.0, 6.0, 10.0], total_steps=7, log_every=3)
    assert [(r["step"], r["loss"]) for r in rows] == [(3, 3.0), (6, 5.0), (7, 10.0)]
    assert all(r["tokens_per_s"] > 0 and "tokens" not in r for r in rows)
    assert result.last_metrics["loss"] == 10.0 and result.final_eval is None


def test_every_checkpoint_ends_a_row_so_a_resume_loses_no_step(tmp_path):
    """log_every 3, save_every 4: rows at 3, 4, 6, 8, 9, 10; a run that crashed at step 7 and
    resumed from the checkpoint at 4 (rows after it dropped) logs the same rows."""
    values = [1.0, 2.0, 6.0, 40.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    _, rows = _run(tmp_path / "whole", values, total_steps=10, log_every=3, save_every=4)
    assert [(r["step"], r["loss"]) for r in rows] == [(3, 3.0), (4, 40.0), (6, 5.5), (8, 7.5), (9, 9.0), (10, 10.0)]
    with pytest.raises(RuntimeError, match="crash"):
        _run(tmp_path / "resumed", values, total_steps=10, log_every=3, save_every=4, crash_at=7)
    _, resumed = _run(tmp_path / "resumed", values[4:], total_steps=10, log_every=3, save_every=4, start=4)
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in rows]


def test_the_good_steps_are_logged_before_a_non_finite_step_stops_the_loop(tmp_path):
    with pytest.raises(NonFiniteError, match="step 3: non-finite"):
        _run(tmp_path, [1.0, 2.0, float("nan"), 4.0], total_steps=4, log_every=10)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(2, 1.5)]


def test_a_signal_logs_the_steps_since_the_last_row_before_stopping(tmp_path):
    result, rows = _run(tmp_path, [1.0, 2.0, 3.0, 4.0, 5.0], total_steps=5, log_every=4, stop_at=3)
    assert result.stopped_by == signal.SIGTERM and int(result.state.step) == 3
    assert [(r["step"], r["loss"]) for r in rows] == [(3, 2.0)]


def test_the_final_steps_eval_is_handed_back_once(tmp_path):
    calls = []
    result, rows = _run(tmp_path, [1.0, 2.0, 3.0], total_steps=3, log_every=1,
                        eval_fn=lambda state: calls.append(int(state.step)) or {"accuracy": 0.5})
    assert calls == [3]  # eval_every 500: only the final step
    assert result.final_eval == {"accuracy": 0.5}
    assert {"step": 3, "eval/accuracy": 0.5} in rows


def test_the_non_finite_message_names_every_loss_and_gradient_norm():
    class Checkpointer:
        directory = "ckpt"

        def latest_step(self):
            return 2

    message = loop.non_finite_message(3, {"policy_loss": 0.1, "value_loss": float("nan"), "actor_grad_norm": 1.0,
                                          "critic_grad_norm": float("nan"), "kl": 0.2}, Checkpointer())
    assert message == ("step 3: non-finite loss or gradient (policy_loss=0.1, value_loss=nan, actor_grad_norm=1.0, "
                       "critic_grad_norm=nan); the update was not applied; last good checkpoint: step 2 in ckpt")


def test_sft_tokens_per_second_counts_no_filler_rows():
    examples = [TokenizedExample(np.array([1, 2, 3, 4], np.int32), np.array([0, 0, 1, 1], bool), "a"),
                TokenizedExample(np.array([1, 2, 3], np.int32), np.array([0, 1, 1], bool), "b")]
    batch = collate(examples + examples[:1], buckets=(8,), pad_id=0, num_counted=2)  # one filler row
    assert counted_tokens(batch) == 7
