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


# Which package may import which: the README's architecture section draws the same picture.
ALLOWED_IMPORTS = {
    "detector": set(),
    "training": {"detector"},
    "serving": {"detector"},
    "vae_anomaly": {"detector", "training", "serving"},
}


def _imported_packages(path: Path) -> set[str]:
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED_IMPORTS)


def test_packages_import_only_downwards() -> None:
    wrong = []
    for package, allowed in ALLOWED_IMPORTS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = _imported_packages(path) - allowed - {package}
            if bad:
                wrong.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert wrong == []


def test_the_library_packages_hold_no_command_line() -> None:
    for package in ("detector", "training", "serving"):
        for path in (ROOT / package).rglob("*.py"):
            assert "argparse" not in path.read_text(), f"{path.relative_to(ROOT)}: CLI code"


def test_readme_draws_the_import_rules() -> None:
    readme = (ROOT / "README.md").read_text()
    for package, allowed in ALLOWED_IMPORTS.items():
        line = f"`{package}` imports " + (
            ", ".join(f"`{p}`" for p in sorted(allowed)) if allowed else "nothing of ours"
        )
        assert line in readme, f"README's architecture section should say: {line}"


def test_library_modules_stay_readable() -> None:
    """No module of the three library packages grows past 450 lines (split it by concern)."""
    long = {
        str(p.relative_to(ROOT)): n
        for package in ("detector", "training", "serving")
        for p in (ROOT / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert long == {}


def test_one_csv_reader() -> None:
    """User files are parsed by pyarrow in two places that share detector.tables' layout rules
    (the whole-file reader and batch scoring's block reader); no pandas or other parser."""
    parsers = {}
    for package in ("detector", "training", "serving"):
        for p in (ROOT / package).rglob("*.py"):
            text = p.read_text()
            if re.search(r"\bread_csv\(|import pandas|from pandas", text):
                parsers[str(p.relative_to(ROOT))] = True
    assert sorted(parsers) == ["detector/tables.py", "serving/batch/csv_reader.py"]
    assert "sniff_csv" in (ROOT / "serving/batch/csv_reader.py").read_text()
