"""The training loop every trainer shares: progress, metrics, evaluation, checkpoints, guards.

``train_loop`` owns no model math. It calls ``step_fn(state, batch) -> (state, metrics)`` for
each batch, logs metrics (JSONL + TensorBoard, process 0 only), evaluates every ``eval_every``
steps, checkpoints every ``save_every`` steps and at the end, stops with ``NonFiniteError`` when
a step reports a non-finite loss or gradient (that update is never applied, and the last good
checkpoint stays the newest), and on SIGTERM/SIGINT saves a checkpoint and returns; the trainer
then raises ``TrainingStopped`` (``LoopResult.raise_if_stopped``) instead of writing its final model.
In a multi-process run the processes agree after every step whether any of them was signalled,
so a signal to one process stops all of them after the same step, with one checkpoint (a
checkpoint save is collective: a process saving alone would wait for the others forever), and
whether process 0's metrics logging failed (``sharding.all_or_none``: then every process stops).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from icegrt_jax import files
from icegrt_jax.checkpoint import StateStructureError, TrainCheckpointer
from icegrt_jax.config import LoggingConfig, TrainingConfig
from icegrt_jax.config_loader import config_to_yaml
from icegrt_jax.data.batching import DataPosition
from icegrt_jax.errors import NonFiniteError, TrainingStopped
from icegrt_jax.hf import CheckpointError, check_replaceable
from icegrt_jax.sharding import all_or_none, gather_flags, is_primary_process


def check_output_dir(out: str) -> None:
    """``training.output_dir`` must be new, empty (hidden files aside) or a run directory (one with
    checkpoints/, which every run creates first), and its final model directories replaceable:
    a trainer never writes into another directory. The trainers check this before loading models."""
    for final in ("final", "final-critic"):
        check_replaceable(os.path.join(out, final))
    try:
        entries = [e for e in os.listdir(out) if not e.startswith(".")] if os.path.isdir(out) else []
    except OSError as e:
        raise CheckpointError(f"training.output_dir {out}: cannot list it ({e.strerror})") from None
    if entries and "checkpoints" not in entries:
        raise CheckpointError(f"training.output_dir {out}: not empty and not a run directory (no checkpoints/); "
                              "refusing to write into it: choose a new or empty directory")


def open_run(cfg, name: str, state, state_shardings, batches, report: list[str]):
    """A trainer's run directory: ``cfg.training.output_dir`` (checked by ``check_output_dir``
    first) with config.yaml, the ``report`` lines (what the data loading truncated or dropped)
    printed as ``[name] ...`` and written to data_report.txt (process 0), and the checkpointer. When the directory holds a
    checkpoint the run resumes from it: the state (restored onto ``state_shardings``) and the
    data position of ``batches``; a config that differs from the saved config.yaml is named (what
    changes the run's course makes it differ from an uninterrupted one) and the saved one kept as
    config.until-step-N.yaml, and a state that no longer fits the
    checkpoint is a one-line ``CheckpointError``. Returns (state, checkpointer)."""
    out = cfg.training.output_dir  # the trainers ran check_output_dir before loading their models
    files.make_directory(out, "training.output_dir")
    config_path = os.path.join(out, "config.yaml")
    checkpointer = TrainCheckpointer(os.path.join(out, "checkpoints"), keep=cfg.training.keep_checkpoints)
    step = checkpointer.latest_step()
    if len(set(gather_flags(-1 if step is None else step))) > 1:
        raise CheckpointError(f"{checkpointer.directory}: the processes see different newest checkpoints; "
                              "training.output_dir must be on a filesystem every process shares")
    changes = config_changes(config_path, cfg) if step is not None and os.path.isfile(config_path) else []
    data_changed = None
    if step is not None:
        def does_not_fit(difference: str) -> CheckpointError:
            changed = f"config changed: {'; '.join(changes)}" if changes else difference
            return CheckpointError(f"{checkpointer.directory}: step {step} does not fit this run's model and "
                                   f"optimizer state ({changed}); resume with the run's config or use a new "
                                   "training.output_dir")

        if mismatch := checkpointer.mismatch(state, step):
            raise does_not_fit(mismatch)
        try:
            state, meta = checkpointer.restore(state, shardings=state_shardings)
        except StateStructureError as e:
            raise does_not_fit(str(e)) from None
        batches.position = DataPosition(**meta["data_position"])
        if meta.get("data", batches.fingerprint) != batches.fingerprint:
            data_changed = f"now {batches.fingerprint}, was {meta['data']}"
    with all_or_none(f"{out}: config.yaml and data_report.txt"):  # process 0 writes, all agree it did
        if is_primary_process():
            if changes:  # the steps so far ran on the saved config: kept beside the new one
                files.write_text(os.path.join(out, f"config.until-step-{step}.yaml"), Path(config_path).read_text())
            files.write_text(config_path, config_to_yaml(cfg))
            files.write_text(os.path.join(out, "data_report.txt"), "".join(f"{line}\n" for line in report))
            for line in report:
                print(f"[{name}] {line}")
            if step is not None:
                print(f"[{name}] resumed from step {int(state.step)} ({checkpointer.directory})")
            if changes:
                print(f"[{name}] note: resuming with a config that differs from the run's: {'; '.join(changes)}")
            if data_changed:
                print(f"[{name}] note: the training data differ from the run's ({data_changed}): from the "
                      "restored data position on, the batches are the new data's")
            if any(change.startswith(("training.steps:", "training.epochs:")) for change in changes):
                print(f"[{name}] note: the learning-rate schedules are recomputed for the new number of steps: "
                      f"from step {int(state.step)} on the rates follow them (a run started with that length "
                      "would have had other rates before)")
    return state, checkpointer


def config_changes(saved_yaml: str, cfg) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between the config.yaml a run
    saved and ``cfg`` (a key on one side only counts as changed)."""
    def flat(tree, prefix=""):
        if not isinstance(tree, dict):
            return {prefix[:-1]: tree}
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    def show(value) -> str:
        text = "(absent)" if value is _ABSENT else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    try:
        old = flat(OmegaConf.to_container(OmegaConf.load(saved_yaml)))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):  # advisory only: never blocks a resume
        return []
    new = flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return [f"{key}: {show(old.get(key, _ABSENT))} -> {show(new.get(key, _ABSENT))}"
            for key in sorted(old.keys() | new.keys()) if old.get(key, _ABSENT) != new.get(key, _ABSENT)]


_ABSENT = object()



def data_position_meta(batches) -> Callable[[], dict]:
    """``train_loop``'s ``meta_fn`` for a ``BatchIterator``: where the next batch comes from, and
    of which data (``BatchIterator.fingerprint``, compared on resume)."""
    return lambda: {"data_position": dataclasses.asdict(batches.position), "data": batches.fingerprint}


class MetricsLogger:
    """Scalars to ``metrics.jsonl`` and TensorBoard under ``directory`` (process 0 only).

    A run starting at ``resume_step`` (0 for a fresh start) first drops what an interrupted run
    logged after that step (the JSONL rewritten atomically, TensorBoard's events purged), so each
    step appears once, as in an uninterrupted run."""

    def __init__(self, directory: str, cfg: LoggingConfig, resume_step: int = 0):
        self._jsonl = self._tensorboard = None
        if not is_primary_process():
            return
        os.makedirs(directory, exist_ok=True)
        if cfg.jsonl:
            path = os.path.join(directory, "metrics.jsonl")
            drop_rows_after(path, resume_step)
            self._jsonl = open(path, "a")  # noqa: SIM115 (closed by close())
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter

            # a suffix of its own: tensorboardX names files by the second, a quick resume would overwrite the last
            self._tensorboard = SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=resume_step + 1,
                                              filename_suffix=f".from{resume_step}.{os.getpid()}")

    def log(self, step: int, metrics: dict[str, float]):
        """Append one row (a full disk is one line naming the file)."""
        if self._jsonl:
            with files.write_errors(self._jsonl.name):
                self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
                self._jsonl.flush()
        if self._tensorboard:
            with files.write_errors(self._tensorboard.logdir):
                for name, value in metrics.items():
                    self._tensorboard.add_scalar(name, value, step)

    def close(self):
        for sink in (self._jsonl, self._tensorboard):
            if sink:
                sink.close()


def shows_progress(logging: LoggingConfig) -> bool:
    """Progress bars are drawn when ``logging.progress`` asks, by the first process only."""
    return logging.progress and is_primary_process()


def drop_rows_after(path: str, step: int):
    """Keep the rows of the JSONL file ``path`` whose ``step`` is <= ``step`` (atomic rewrite).
    A torn last line from a killed process is dropped too; any other line that is not a JSON
    object is dropped with a warning that counts them."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept, unreadable = [], 0
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            torn = number == len(lines) and not line.endswith("\n")
            unreadable += not torn
            continue
        if row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if unreadable:
        print(f"warning: {path}: dropped {unreadable} line(s) that are not JSON objects", file=sys.stderr)
    files.write_text(path, "".join(kept))


class StopRequest:
    """SIGTERM/SIGINT set ``signum`` instead of killing the process (preemption)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def agreed(self) -> int | None:
        """The signal received so far, the same on every process: in a multi-process run, the
        first process's (in process order) that got one. A collective: every process calls it at
        the same point. A signal arriving after the call counts at the next call."""
        return next((int(s) for s in gather_flags(self.signum or 0) if s), None)

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats (one host transfer for the whole dict)."""
    return {name: float(np.asarray(value)) for name, value in jax.device_get(metrics).items()}


RATES = {"tokens": ("tokens_per_s", "step_time_s"), "generated_tokens": ("generate_tokens_per_s", "time_generate_s")}


def interval_means(rows: list[dict[str, float]]) -> dict[str, float]:
    """One metrics row for the steps since the last logged one: each metric's mean over the steps
    that report it (a metric absent from some steps, as PPO's policy loss during the critic
    warm-up, averages the others), the extremes of ``*_min`` and ``*_max`` metrics, and for a
    count in ``RATES`` its rate over the interval, ``sum(count) / sum(time)`` (not the mean of
    per-step rates)."""
    out = {}
    for name in dict.fromkeys(name for row in rows for name in row):
        values = [row[name] for row in rows if name in row]
        if name in RATES:
            rate, time_name = RATES[name]
            out[rate] = sum(values) / sum(row[time_name] for row in rows if name in row)
        else:
            reduce = min if name.endswith("_min") else max if name.endswith("_max") else np.mean
            out[name] = float(reduce(values))
    return out


def non_finite_message(step: int, metrics: dict[str, float], checkpointer) -> str:
    """``NonFiniteError``'s line: the step, its losses and gradient norms, the last good checkpoint."""
    shown = ", ".join(f"{name}={value}" for name, value in metrics.items() if "loss" in name or "grad_norm" in name)
    return (f"step {step}: non-finite loss or gradient ({shown}); the update was not applied; "
            f"last good checkpoint: step {checkpointer.latest_step()} in {checkpointer.directory}")


@dataclasses.dataclass
class LoopResult:
    state: Any
    stopped_by: int | None  # the signal that preempted the loop (its checkpoint saved), if any
    last_metrics: dict[str, float]  # the last logged row
    final_eval: dict[str, float] | None = None  # eval_fn's result on the final step's state, if it ran

    def raise_if_stopped(self, checkpointer):
        """``TrainingStopped`` when a signal preempted the loop (the trainer then writes no final model)."""
        if self.stopped_by is not None:
            raise TrainingStopped(self.stopped_by, f"stopped by {signal.Signals(self.stopped_by).name} at step "
                                  f"{int(self.state.step)}; checkpoint saved in {checkpointer.directory}: rerun "
                                  "the same command to resume")


def train_loop(*, state, step_fn: Callable, batches: Iterator, total_steps: int, checkpointer,
               meta_fn: Callable[[], dict], training: TrainingConfig, logging: LoggingConfig,
               output_dir: str, eval_fn: Callable[[Any], dict] | None = None,
               tokens_fn: Callable[[Any], int] | None = None, desc: str = "train",
               progress_keys: tuple[str, ...] = ("loss",)) -> LoopResult:
    """Run ``step_fn`` from ``state.step`` up to ``total_steps``; see the module docstring.

    Every ``log_every`` steps and at every checkpoint (``save_every`` steps, the last step, a
    signal), one metrics row is logged: ``interval_means`` of the steps since the previous row, so
    a resumed run logs the rows an uninterrupted one would; before a ``NonFiniteError``, the good
    steps' row. ``meta_fn()`` returns the JSON-able resume information saved with each checkpoint
    (the data position after the last consumed batch). ``tokens_fn(batch)`` counts a batch's tokens
    for ``tokens_per_s``. The progress bar shows the step's ``progress_keys`` metrics.
    """
    start = int(state.step)
    if start > total_steps:
        raise CheckpointError(f"{checkpointer.directory}: the run is at step {start}, past the {total_steps} steps "
                              "this config gives (training.steps or epochs lowered?); use a new training.output_dir "
                              f"or at least {start} steps")
    with all_or_none(f"{output_dir}: opening the metrics logs"):  # process 0 opens them, all agree it did
        logger = MetricsLogger(output_dir, logging, resume_step=start)
    show = shows_progress(logging)
    logged: dict[str, float] = {}
    pending: list[dict[str, float]] = []  # the steps since the last logged row
    stopped = final_eval = None
    try:
        with StopRequest() as stop, tqdm(total=total_steps, initial=start, desc=desc, disable=not show) as bar:
            for step in range(start + 1, total_steps + 1):
                began = time.perf_counter()
                batch = next(batches)
                state, device_metrics = step_fn(state, batch)
                metrics = to_floats(device_metrics)
                if metrics.pop("finite", 1.0) != 1.0:
                    with all_or_none(f"step {step - 1}: logging metrics"):  # the good steps' row first
                        if pending:
                            logger.log(step - 1, interval_means(pending))
                    raise NonFiniteError(non_finite_message(step, metrics, checkpointer))
                metrics["step_time_s"] = time.perf_counter() - began
                if tokens_fn is not None:
                    metrics["tokens"] = tokens_fn(batch)
                pending.append(metrics)
                evaluated = (eval_fn(state) if eval_fn is not None
                             and (step % training.eval_every == 0 or step == total_steps) else None)
                if step == total_steps:
                    final_eval = evaluated
                stopped = stop.agreed()
                checkpoint_due = step % training.save_every == 0 or step == total_steps or stopped is not None
                with all_or_none(f"step {step}: logging metrics"):  # process 0 writes, all agree it did
                    if step % training.log_every == 0 or checkpoint_due:  # a resume starts after a row
                        logged = interval_means(pending)
                        logger.log(step, logged)
                        pending.clear()
                    if evaluated is not None:
                        logger.log(step, {f"eval/{k}": v for k, v in evaluated.items()})
                    bar.set_postfix({k: f"{metrics[k]:.4g}" for k in progress_keys if k in metrics})
                    bar.update(1)
                if checkpoint_due:
                    checkpointer.save(step, state, meta_fn(), force=True)
                if stopped is not None:
                    break
    finally:
        checkpointer.wait()
        logger.close()
    return LoopResult(state=state, stopped_by=stopped, last_metrics=logged, final_eval=final_eval)
