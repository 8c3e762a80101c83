"""Outputs that cannot be written (a full disk, a file-size limit) are one line, and leave nothing;
outputs named through a symbolic link are written where it points."""

import logging
import os
import resource
import signal
import subprocess
import sys

import pytest
from helpers import make_hf_llama

from icegrt_jax import cli, files, hf
from icegrt_jax.errors import UserInputError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_hf_llama(path, heads=4, kv_heads=2, tied=False)
    return path


def _file_size_limit(limit: int):
    """A ``preexec_fn``: files of at most ``limit`` bytes (a write past it fails with EFBIG rather
    than killing the process with SIGXFSZ)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _run_limited(limit: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icegrt_jax.cli", *argv], capture_output=True, text=True,
                          preexec_fn=_file_size_limit(limit), env={**os.environ, "ICEGRT_MALLOC_HUGEPAGES": "0"},
                          check=False, timeout=300)


def _messages(stderr: str) -> list[str]:
    """stderr without the progress bars."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(("load ", "save shards"))]


@pytest.mark.parametrize("direction", ["to_project", "to_hf"])
def test_convert_past_a_file_size_limit_is_one_line_and_leaves_nothing(hf_dir, tmp_path, direction):
    """Orbax's writer (its errors come from background threads, at the wait) and the safetensors
    writer alike."""
    src = hf_dir
    if direction == "to_hf":
        src = tmp_path / "project"
        assert cli.main(["convert", str(hf_dir), str(src)]) == 0
    out = tmp_path / "out"
    result = _run_limited(20_000, "convert", str(src), str(out))
    assert result.returncode == 2, result.stderr
    assert _messages(result.stderr) == [f"icegrt convert: error: {out}: cannot write (File too large)"], result.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_a_training_checkpoint_past_a_file_size_limit_is_one_line(tmp_path):
    """The asynchronous save fails in a background thread: the wait raises it as one line."""
    script = ("import sys, numpy as np; from icegrt_jax.checkpoint import TrainCheckpointer\n"
              "c = TrainCheckpointer(sys.argv[1])\n"
              "try:\n"
              "    c.save(1, {'w': np.random.default_rng(0).random(100_000, np.float32)}, {'step': 1}); c.wait()\n"
              "except Exception as e:\n"
              "    print(type(e).__name__, e)\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "checkpoints")], capture_output=True,
                            text=True, preexec_fn=_file_size_limit(20_000), check=False, timeout=300)
    assert result.stdout == f"CheckpointError {tmp_path / 'checkpoints'}: cannot write (File too large)\n", result.stderr
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr


def test_write_failure_finds_the_os_reason():
    assert files.write_failure(OSError(28, "No space left on device")) == "No space left on device"
    orbax = ValueError("RESOURCE_EXHAUSTED: Error writing \"w/0\": Failed to write 459 bytes to file 18: "
                       "No space left on device [os_error_code='28']")
    assert files.write_failure(orbax) == os.strerror(28)
    try:
        try:
            raise OSError(27, "File too large")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        assert files.write_failure(wrapped) == "File too large"
    try:
        try:
            raise FileNotFoundError(2, "No such file or directory")
        except OSError:
            raise ValueError("not a write") from None
    except ValueError as unrelated:
        assert files.write_failure(unrelated) is None
    with pytest.raises(UserInputError, match=r"^out: cannot write \(No space left on device\)$"), \
            files.write_errors("out"):
        raise OSError(28, "No space left on device")


def test_convert_into_a_symbolic_link_writes_where_it_points(hf_dir, tmp_path, caplog):
    """The link stays a link (to the new model); nothing is left beside either, and a second
    write warns of nothing."""
    target, link = tmp_path / "target", tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)  # dangling at first
    for _ in range(2):
        with caplog.at_level(logging.WARNING):
            assert cli.main(["convert", str(hf_dir), str(link)]) == 0
        assert link.is_symlink() and (target / "config.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
        assert not caplog.records, caplog.text


def test_a_symbolic_link_an_old_write_moved_aside_is_unlinked(hf_dir, tmp_path, caplog):
    """Older versions moved a linked output aside as a link (``OUT.old-<host>-<pid>``, its writer
    dead): it is removed as a link (rmtree refused it, and every write said it removed it)."""
    out = tmp_path / "out"
    assert cli.main(["convert", str(hf_dir), str(out)]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    old = tmp_path / f"{hf._temporary_prefix(str(out), 'old').rsplit('/', 1)[1]}{dead}"
    old.symlink_to(elsewhere, target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        assert cli.main(["convert", str(hf_dir), str(out)]) == 0
    assert not os.path.lexists(old) and elsewhere.is_dir()
    assert [r.getMessage() for r in caplog.records] == [
        f"removed {old}, the model an interrupted earlier write replaced at {out}"]
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        assert cli.main(["convert", str(hf_dir), str(out)]) == 0
    assert not caplog.records
