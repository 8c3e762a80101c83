"""Two processes joined by jax.distributed (gloo CPU collectives) train SFT, and run PPO, like one
process.

Each process has one CPU device; the mesh ``data=-1`` spans both, every process builds the same
global batch and feeds its own rows. The run is split in two launches so the second restores
the first's checkpoint on every process. Tolerance: parameters within 1e-4 after 3 AdamW steps at
lr 1e-3 (the gradient is summed in a different order; Adam's per-coordinate normalisation turns
rounding noise on near-zero gradients into at most ~lr per step), losses within 1e-5 relative.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from icegrt_jax.checkpoint import load_model

RECORDS = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "Write a short poem about the sea.", "response": "Waves roll in and out again."},
    {"prompt": "Numbers: 1 2 3?", "response": "4 5 6."},
    {"prompt": "The quick brown fox?", "response": "Jumps over the lazy dog."},
    {"prompt": "Numbers: 7 8?", "response": "9 0 1 2."},
    {"prompt": "What is 2 + 2?", "response": "4."},
]
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))  # ppo_scorers is imported from here
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_config(tmp_path, tokenizer_dir, name: str) -> str:
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in RECORDS)
    config = {
        "model": {"preset": "tiny", "vocab_size": 512},
        "optimizer": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
        "data": {"train_files": [str(tmp_path / "train.jsonl")], "tokenizer_path": tokenizer_dir,
                 "max_length": 64, "batch_size": 4, "bucket_boundaries": [64]},
        "training": {"steps": 3, "save_every": 2, "log_every": 1, "output_dir": str(tmp_path / name)},
        "mesh": {"data": -1},
        "logging": {"progress": True, "tensorboard": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return str(path)


def launch(config: str, steps: int, num_processes: int, command: str = "sft",
           overrides: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """``icegrt COMMAND`` in ``num_processes`` processes (JAX_* variables name the coordinator)."""
    port = free_port()
    procs = []
    for rank in range(num_processes):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE,
               "PYTHONPATH": os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])}
        if num_processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                       JAX_PROCESS_ID=str(rank))
        cmd = [sys.executable, "-m", "icegrt_jax.cli", command, "--config", config, f"training.steps={steps}",
               *overrides]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def kill_and_fail(procs, message: str):
    for p in procs:
        p.kill()
        p.wait()
    pytest.fail(message)


def wait_all(procs, hung: str = "a training process hung") -> list[tuple[str, str]]:
    """Each process's (stdout, stderr); the test fails with ``hung`` (all killed) if one does not end."""
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            kill_and_fail(procs, hung)
    return outputs


def finish(procs) -> list[tuple[str, str]]:
    outputs = wait_all(procs)
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return outputs


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_two_processes_train_like_one(tmp_path, tiny_tokenizer_dir):
    multi = sft_config(tmp_path, tiny_tokenizer_dir, "multi")
    single = sft_config(tmp_path, tiny_tokenizer_dir, "single")
    reference = launch(single, steps=3, num_processes=1)
    first = finish(launch(multi, steps=2, num_processes=2))
    resumed = finish(launch(multi, steps=3, num_processes=2))
    finish(reference)

    assert "resumed from step 2" in resumed[0][0]
    progress_bar = re.compile(r"sft: +\d+%")
    assert progress_bar.search(first[0][1]) and not progress_bar.search(first[1][1])  # on process 0 only
    multi_metrics, single_metrics = metrics(tmp_path / "multi"), metrics(tmp_path / "single")
    assert [m["step"] for m in multi_metrics] == [1, 2, 3]  # logged once, by process 0
    for m, s in zip(multi_metrics, single_metrics, strict=True):
        assert m["loss"] == pytest.approx(s["loss"], rel=1e-5)
    _, multi_params = load_model(str(tmp_path / "multi" / "final"))
    _, single_params = load_model(str(tmp_path / "single" / "final"))
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         multi_params, single_params)
    assert max(jax.tree.leaves(diffs)) < 1e-4


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path, tiny_tokenizer_dir):
    """SIGTERM to process 1 alone (as when one node is preempted): both processes stop after the
    same step, with one checkpoint of it, and exit 128 + SIGTERM (no process waits forever in the
    collective checkpoint save); the rerun resumes from that step."""
    config = sft_config(tmp_path, tiny_tokenizer_dir, "preempted")
    procs = launch(config, steps=100_000, num_processes=2)
    log = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and log.read_text().count("\n") >= 2) and all(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            kill_and_fail(procs, "no 2 steps logged within 240 s")
        time.sleep(0.2)  # until both processes are inside the loop
    assert all(p.poll() is None for p in procs), wait_all(procs)[0][1][-2000:]  # neither ended early
    procs[1].send_signal(signal.SIGTERM)
    outputs = wait_all(procs, "a process did not stop: the signal reached one process only")
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outputs[0][1][-2000:]
    steps = {int(m.group(1)) for _, err in outputs for m in re.finditer(r"stopped by SIGTERM at step (\d+)", err)}
    assert len(steps) == 1, steps  # the same step on both
    step = steps.pop()
    assert (tmp_path / "preempted" / "checkpoints" / str(step)).is_dir()
    resumed = finish(launch(config, steps=step + 1, num_processes=2))
    assert f"resumed from step {step}" in resumed[0][0]  # process 0 reports it


def ppo_config(tmp_path, tokenizer_dir, name: str) -> str:
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": r["prompt"]}) + "\n" for r in RECORDS)
    config = {
        "model": {"preset": "tiny", "vocab_size": 512},
        "actor_optimizer": {"lr": 1e-3, "schedule": "constant"},
        "critic_optimizer": {"lr": 1e-3, "schedule": "constant"},
        "data": {"prompt_files": [str(tmp_path / "prompts.jsonl")], "tokenizer_path": tokenizer_dir,
                 "prompts_per_iteration": 4},
        "rollout": {"max_new_tokens": 8},
        "reward": {"function": "ppo_scorers:letter_e_share"},
        "ppo": {"kl_coef": 0.05, "epochs": 1, "minibatches": 1},
        "training": {"steps": 2, "save_every": 100, "log_every": 1, "output_dir": str(tmp_path / name)},
        "mesh": {"data": -1},
        "logging": {"progress": False, "tensorboard": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return str(path)


def test_two_processes_run_ppo_like_one(tmp_path, tiny_tokenizer_dir):
    """Sampling on a mesh that spans both processes (outputs gathered to each), a programmatic
    scorer on every process, sharded scoring and updates: the same rollouts (identical response
    lengths and scores) and the same actor and critic as one process, within the SFT tolerance."""
    multi = ppo_config(tmp_path, tiny_tokenizer_dir, "multi")
    single = ppo_config(tmp_path, tiny_tokenizer_dir, "single")
    reference = launch(single, steps=2, num_processes=1, command="ppo")
    finish(launch(multi, steps=2, num_processes=2, command="ppo"))
    finish(reference)

    multi_metrics, single_metrics = metrics(tmp_path / "multi"), metrics(tmp_path / "single")
    assert [m["step"] for m in multi_metrics] == [1, 2]
    for m, s in zip(multi_metrics, single_metrics, strict=True):
        assert m["response_length"] == s["response_length"]
        assert m["score_raw_mean"] == pytest.approx(s["score_raw_mean"], abs=1e-7)
        assert m["value_loss"] == pytest.approx(s["value_loss"], rel=1e-4)
    for final in ("final", "final-critic"):
        _, multi_params = load_model(str(tmp_path / "multi" / final))
        _, single_params = load_model(str(tmp_path / "single" / final))
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                             multi_params, single_params)
        assert max(jax.tree.leaves(diffs)) < 1e-4, final


def test_a_scorer_failing_on_process_0_stops_both_processes(tmp_path, tiny_tokenizer_dir):
    """Process 0 scores for everyone; when its scorer's output is wrong, both processes exit 2
    (process 0 naming the problem, process 1 pointing to it) instead of one waiting forever in the
    broadcast of the scores."""
    config = ppo_config(tmp_path, tiny_tokenizer_dir, "bad-scorer")
    procs = launch(config, steps=1, num_processes=2, command="ppo",
                   overrides=("reward.function=ppo_scorers:short_on_process_0",))
    outputs = wait_all(procs, "a process hung after the scorer failed on process 0")
    assert [p.returncode for p in procs] == [2, 2], outputs[1][1][-2000:]
    assert "returned shape (3,) for 4 responses" in outputs[0][1]
    assert "the scorer failed on process 0" in outputs[1][1]
