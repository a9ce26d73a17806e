from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from detector.detector import Detector
from training.pipeline import TrainOutcome
from vae_anomaly.cli import main

TRAIN_FAST = [
    "train", "--dataset", "digits", "--normal-class", "0", "--arch", "mlp", "--widths", "64,32",
    "--latent-dim", "4", "--epochs", "30", "--batch-size", "32", "--target-fpr", "0.05",
    "--cal-fraction", "0.25", "--no-progress", "--min-steps", "0",
]  # fmt: skip


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: --help and usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_info_evaluate_score_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m"
    code, out, err = _run(capsys, *TRAIN_FAST, "--out", str(model))
    assert code == 0, err
    assert "threshold" in out and "artifact" in out and model.is_dir()

    code, out, _ = _run(capsys, "info", "--model", str(model))
    assert code == 0 and "model version" in out and "digits (normal class 0)" in out
    code, out, _ = _run(capsys, "info", "--model", str(model), "--json")
    assert json.loads(out)["input"]["shape"] == [1, 8, 8]

    report = tmp_path / "eval.json"
    code, out, err = _run(capsys, "evaluate", "--model", str(model), "--out", str(report))
    assert code == 0, err
    res = json.loads(report.read_text())
    assert "AUROC" in out and "observed FPR" in out
    assert 0.9 < res["auroc"] <= 1.0 and 0 <= res["observed_fpr"] <= 1
    assert res["n_normal"] + res["n_anomalous"] == res["n"] == 599

    x = np.random.default_rng(0).uniform(0, 16, size=(30, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out_csv = tmp_path / "scores.csv"
    code, out, err = _run(
        capsys,
        "score",
        "--model",
        str(model),
        str(tmp_path / "x.npy"),
        "--scale",
        "16",
        "--out",
        str(out_csv),
    )
    assert code == 0, err
    df = pd.read_csv(out_csv)
    ref = Detector.load(model).score(x / 16)
    np.testing.assert_allclose(df["score"], ref.score, rtol=1e-5)
    np.testing.assert_array_equal(df["is_anomaly"], ref.is_anomaly)
    assert list(df.columns) == [
        "source",
        "row",
        "score",
        "reconstruction",
        "kl",
        "complexity",
        "neighbour",
        "transformation",
        "p_value",
        "is_anomaly",
    ]
    assert list(df["row"]) == list(range(30))

    # refuses to overwrite results or the artifact
    code, _, err = _run(
        capsys, "score", "--model", str(model), str(tmp_path / "x.npy"), "--out", str(out_csv)
    )
    assert code == 1 and "already exists; pass --overwrite" in err
    code, _, err = _run(capsys, *TRAIN_FAST, "--out", str(model))
    assert code == 1 and "already exists" in err


def _one_line_error(code: int, err: str, expect: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--dataset", "cifar"], "unknown data set 'cifar'"),
        (
            ["--dataset", "digits", "--normal-class", "11"],
            "normal class 11 is not a class of digits",
        ),
        (["--dataset", "missing.npy"], "missing.npy: no such file"),
        (["--target-fpr", "1.5"], "target FPR must be strictly between 0 and 1"),
        (["--target-fpr", "0.001", "--calibration", "split"], "below 1/n"),
        (
            ["--target-fpr", "0.001"],
            "target FPR 0.001 needs at least 1000 normal rows, even with every row a calibration "
            "point (cross-fit); the data has 119",
        ),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_train_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expect: str
) -> None:
    out = tmp_path / "m"
    code, _, err = _run(capsys, *TRAIN_FAST, "--out", str(out), *extra)
    _one_line_error(code, err, expect)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial artifact, no temp dir


def test_train_on_infinite_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """NaN in a table is a missing value (it trains); an infinity is refused, naming the column."""
    x = np.random.default_rng(0).normal(size=(200, 5))
    x[17, 2] = np.inf
    np.save(tmp_path / "x.npy", x)
    code, _, err = _run(
        capsys, "train", "--dataset", str(tmp_path / "x.npy"), "--out", str(tmp_path / "m")
    )
    _one_line_error(code, err, "column '2' holds an infinite value")
    assert not (tmp_path / "m").exists()


def test_train_on_user_features(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(loc=50.0, scale=10.0, size=(600, 5)).astype(np.float32)
    np.save(tmp_path / "normal.npy", x)
    code, _out, err = _run(
        capsys,
        "train",
        "--dataset",
        str(tmp_path / "normal.npy"),
        "--epochs",
        "3",
        "--min-steps",
        "0",
        "--target-fpr",
        "0.05",
        "--no-progress",
        "--out",
        str(tmp_path / "m"),
    )
    assert code == 0, err
    det = Detector.load(tmp_path / "m")
    assert det.model.config.architecture == "mlp" and det.input_spec.value_range is None
    far = det.score(np.full((1, 5), 500.0, np.float32))
    assert far.is_anomaly[0]


def test_train_score_options_reach_the_artifact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m"
    code, out, err = _run(
        capsys,
        *TRAIN_FAST,
        "--neighbour-share",
        "0",
        "--complexity-cap",
        "none",
        "--calibration",
        "cross-fit",
        "--reconstruction-weight",
        "0.5",
        "--transformation-share",
        "0.2",
        "--out",
        str(model),
    )
    assert code == 0, err
    assert "each scored by one of 5 models that never saw it" in out
    cal = json.loads((model / "calibration.json").read_text())
    assert cal["protocol"] == "cross-fit" and cal["complexity_cap"] is None
    assert cal["reconstruction_weight"] == 0.5  # images default to 1; asked for, it is kept
    assert cal["neighbour_weight"] == 0.0 and cal["n_reference"] == 0
    assert not (model / "reference.safetensors").exists()
    # the transformation head at the share asked for: its weight and offset fitted, its layers saved
    assert cal["transformation_weight"] > 0 and cal["transformation_offset"] > 0
    assert (model / "head.safetensors").exists()
    res = Detector.load(model).score(np.zeros((2, 1, 8, 8), np.float32))
    assert (res.neighbour == 0).all() and (res.transformation > 0).all()
    for flag, value in (
        ("--neighbour-share", "-1"),
        ("--complexity-cap", "1.5"),
        ("--reconstruction-weight", "0"),
        ("--reconstruction-weight", "nan"),
        ("--transformation-share", "-0.5"),
        ("--transformation-share", "inf"),
    ):
        code, _, err = _run(capsys, *TRAIN_FAST, flag, value, "--out", str(tmp_path / "x"))
        assert code == 2 and f"argument {flag}" in err


@pytest.fixture
def model_dir(trained: TrainOutcome) -> Path:
    assert trained.path is not None
    return trained.path


@pytest.mark.parametrize(
    ("array", "expect"),
    [
        (
            np.zeros((4, 10), np.float32),
            "has 10 features per sample (shape (4, 10)), but the model is expecting 64",
        ),
        (np.full((3, 64), np.nan, np.float32), "x.npy, row 0: NaN in feature 0"),
        (np.full((3, 64), 16.0, np.float32), "outside the model's input range [0, 1]"),
    ],
)
def test_score_bad_input(
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    array: np.ndarray,
    expect: str,
) -> None:
    np.save(tmp_path / "x.npy", array)
    out = tmp_path / "s.csv"
    code, _, err = _run(
        capsys, "score", "--model", str(model_dir), str(tmp_path / "x.npy"), "--out", str(out)
    )
    _one_line_error(code, err, expect)
    assert "x.npy" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_score_missing_file_and_model(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys,
        "score",
        "--model",
        str(model_dir),
        str(tmp_path / "nope.npy"),
        "--out",
        str(tmp_path / "s.csv"),
    )
    _one_line_error(code, err, "nope.npy: no such file")
    code, _, err = _run(capsys, "info", "--model", str(tmp_path / "nomodel"))
    _one_line_error(code, err, "does not exist or is not a directory")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_with_own_labels(
    model_dir: Path, trained: TrainOutcome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = trained.split
    assert s.x_test is not None and s.labels_test is not None
    np.save(tmp_path / "x.npy", s.x_test)
    np.save(tmp_path / "labels.npy", s.labels_test)
    code, _out, err = _run(
        capsys,
        "evaluate",
        "--model",
        str(model_dir),
        "--data",
        str(tmp_path / "x.npy"),
        "--labels",
        str(tmp_path / "labels.npy"),
        "--normal-class",
        "0",
        "--out",
        str(tmp_path / "r.json"),
    )
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["n_anomalous"] == int(
        (s.labels_test != 0).sum()
    )
    code, _, err = _run(
        capsys,
        "evaluate",
        "--model",
        str(model_dir),
        "--data",
        str(tmp_path / "x.npy"),
        "--labels",
        str(tmp_path / "labels.npy"),
    )
    _one_line_error(code, err, "labels must be 0 (normal) or 1 (anomalous)")


@pytest.mark.parametrize(
    "cmd", [[], ["data", "fetch"], ["train"], ["evaluate"], ["score"], ["info"]]
)
def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str], cmd: list[str]) -> None:
    code, out, _ = _run(capsys, *cmd, "--help")
    assert code == 0 and "usage:" in out
    if cmd:
        code, _, err = _run(capsys, *cmd, "--bogus-flag")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "(see --help)" in err


def test_every_command_help_renders_its_text() -> None:
    """argparse collapses "%%" only in option help, not in a description: no command's --help
    may show a doubled percent sign."""
    commands = _subparsers()
    assert "benchmark" in commands
    for name, p in commands.items():
        text = p.format_help()
        assert "usage:" in text and "%%" not in text, name


def test_every_command_sets_a_passive_thread_policy_before_torch_loads() -> None:
    import os
    import subprocess
    import sys

    from serving.cpus import cpu_quota

    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    probe = (
        "import os, sys\n"
        "from vae_anomaly.cli import set_thread_policy\n"
        "too_late = set_thread_policy()\n"
        "print(too_late, 'torch' in sys.modules, os.environ['OMP_WAIT_POLICY'],"
        " os.environ['OMP_NUM_THREADS'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False", "PASSIVE", str(cpu_quota())]
    # a policy the user chose is kept
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["False", "False", "ACTIVE", "3"]


def test_the_package_runs_as_a_module_and_exports_the_detector() -> None:
    import subprocess
    import sys

    import vae_anomaly
    from detector import Detector as CoreDetector

    assert vae_anomaly.Detector is CoreDetector
    done = subprocess.run(
        [sys.executable, "-m", "vae_anomaly", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("train", "score", "serve", "benchmark", "evaluate", "report", "info"):
        assert command in done.stdout


def _subparsers() -> dict:
    from vae_anomaly.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_readme_train_options_match_the_parser() -> None:
    """The README's list of train options and defaults cannot go stale: it is read against
    ``train --help``'s parser, option by option."""
    import re

    from detector.model import DEFAULT_WIDTHS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    para = readme.split("Main `train` options")[1].split("\n\n")[0]
    listed = re.findall(r"`(--[a-z-]+) ([^`]+)`", para)
    assert len(listed) >= 15
    actions = {a.option_strings[-1]: a for a in _subparsers()["train"]._actions if a.option_strings}
    for name, value in listed:
        assert name in actions, f"README lists {name}, which train does not have"
        action = actions[name]
        alternatives = value.split("|")
        default = action.default
        if name == "--widths" and default == ():
            default = DEFAULT_WIDTHS[actions["--arch"].default]
        if isinstance(default, tuple):
            assert alternatives[0] == ",".join(str(v) for v in default), name
        elif isinstance(default, int | float) and not isinstance(default, bool):
            assert float(alternatives[0]) == float(default), (
                f"{name}: README {value}, parser {default}"
            )
        else:
            assert alternatives[0] == str(default), f"{name}: README {value}, parser {default}"
        if action.choices is not None:
            assert set(alternatives) <= set(action.choices), name


def test_readme_commands_exist() -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    commands = set(re.findall(r"`vae-anomaly ([a-z-]+)", readme))
    assert {"train", "evaluate", "score", "serve", "benchmark", "report", "info"} <= commands
    assert commands <= set(_subparsers()), commands - set(_subparsers())


def test_every_command_line_in_the_docs_uses_options_that_exist() -> None:
    """Each ``vae-anomaly COMMAND ... --option`` written in the README or a docs page is read
    against that command's parser: an option renamed or removed breaks this test, not a user."""
    import re

    root = Path(__file__).resolve().parents[2]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    commands = _subparsers()

    def options(parser: argparse.ArgumentParser) -> set[str]:
        found = {o for a in parser._actions for o in a.option_strings}
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for child in a.choices.values():
                    found |= options(child)
        return found

    checked = 0
    for page in pages:
        if page.name == "experiments.md":  # a log of what was run then, not a manual
            continue
        for line in page.read_text().splitlines():
            for m in re.finditer(r"vae-anomaly ([a-z-]+)([^`|\n;&]*)", line):
                command, rest = m.group(1), m.group(2)
                if command not in commands:
                    continue
                known = options(commands[command])
                for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", rest):
                    assert opt in known, f"{page.name}: vae-anomaly {command} has no {opt}"
                    checked += 1
    assert checked > 30


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_loadtest_refuses_a_cpu_it_may_not_use_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beyond = str(max(os.sched_getaffinity(0)) + 1)
    code, out, err = _run(capsys, "loadtest", "--model", str(tmp_path), "--client-cpus", beyond)
    assert code == 1 and f"client CPUs: CPU {beyond} is not one this process may use" in err
    assert out == ""  # no table header: nothing started
