"""The repository keeps its promises: README commands, CI calling them, nothing unwanted tracked."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks]


def test_readme_opens_with_two_commands_and_ci_runs_the_second() -> None:
    first, second = _readme_commands()[:2]
    assert "\n" not in first and "\n" not in second
    assert "requirements/cpu.txt" in first and "vae-anomaly train" in first and "evaluate" in first
    assert second.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert second in ci, ".ci/run must call the README's test command verbatim"


def test_cpu_pin_is_exact() -> None:
    lines = [ln.strip() for ln in (ROOT / "requirements" / "cpu.txt").read_text().splitlines()]
    assert "torch==2.13.0" in lines


def test_no_data_or_weights_are_tracked() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    bad = [
        f
        for f in tracked
        if f.endswith((".safetensors", ".npy", ".npz", ".pt", ".pth", ".tgz", "-ubyte", ".gz"))
    ]
    assert bad == []
