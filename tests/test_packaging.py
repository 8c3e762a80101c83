"""What a wheel install holds: `icegrt demo` and `icegrt eval` read their configs from the package,
so they must work outside an editable checkout too."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_demo_and_eval_configs(tmp_path):
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ behind
    shutil.copytree(ROOT / "icegrt_jax", source / "icegrt_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist())
    configs = ROOT / "icegrt_jax" / "configs"
    expected = {"icegrt_jax/configs/demo.yaml"} | {f"icegrt_jax/configs/eval/{p.name}" for p in (configs / "eval").iterdir()}
    assert len(expected) > 10 and expected <= names, sorted(expected - names)
    assert (ROOT / "configs" / "demo.yaml").resolve() == configs / "demo.yaml"  # the checkout's path links there
