"""SIGINT/SIGTERM to the ``icegrt`` command: one line and exit 128 + the signal outside the
training loop; inside it, a checkpoint is saved first (the loop's own handlers)."""

import errno
import os
import signal
import subprocess
import sys
import time

import helpers
import pytest
from test_sft import run_killed, sft_setup  # noqa: F401 - sft_setup is a fixture

from icegrt_jax.checkpoint import TrainCheckpointer
from icegrt_jax.cli import command_name


def _wait_for_reader(fifo, process, timeout=120.0):
    """Block until ``process`` has opened ``fifo`` for reading (it then waits in read())."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        time.sleep(0.05)
    raise AssertionError(f"no reader opened {fifo}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_outside_training_is_one_line_and_exit_128_plus_signal(tmp_path, sig):
    """``icegrt generate`` stopped while it reads its prompts (a FIFO, so the moment is known)."""
    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    process = subprocess.Popen(
        [sys.executable, "-m", "icegrt_jax.cli", "generate", "--model", str(tmp_path / "model"), "--prompts",
         str(fifo), "--out", str(tmp_path / "out.jsonl")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "ICEGRT_MALLOC_HUGEPAGES": "0"})
    writer = _wait_for_reader(fifo, process)
    try:
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
    finally:
        os.close(writer)
    assert process.returncode == 128 + sig, err
    assert err == f"icegrt generate: interrupted by {signal.Signals(sig).name}\n" and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_a_signal_in_the_training_loop_still_saves_a_checkpoint_from_the_console(sft_setup, monkeypatch):  # noqa: F811
    """Through ``console_main`` (whose handlers exit at once), the loop's handlers take over while it
    runs: SIGINT stops it after a step with a checkpoint, as a preemption."""
    tmp_path, config = sft_setup
    direct = "from icegrt_jax.cli import main\nsys.exit(main(sys.argv[5:]))"
    assert direct in helpers.KILLER
    monkeypatch.setattr(helpers, "KILLER", helpers.KILLER.replace(
        direct, "from icegrt_jax.cli import console_main\nsys.argv[1:] = sys.argv[5:]\nsys.exit(console_main())"))
    monkeypatch.setenv("ICEGRT_MALLOC_HUGEPAGES", "0")  # no re-execution: the patched step stays
    result = run_killed(config, tmp_path / "preempted", kill_at=4, sig="SIGINT")
    assert result.returncode == 128 + signal.SIGINT, result.stderr
    assert "icegrt sft: stopped by SIGINT at step 5; checkpoint saved in" in result.stderr
    assert "interrupted" not in result.stderr
    assert TrainCheckpointer(str(tmp_path / "preempted" / "checkpoints")).latest_step() == 5


def test_command_name_is_the_first_word():
    assert command_name(["sft", "--config", "x"]) == "sft"
    assert command_name(["--help"]) == "" and command_name([]) == ""
