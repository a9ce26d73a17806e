"""Input patterns to files, the output's side files, and the output's checks before a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detector.errors import InputError
from serving.batch.options import INPUT_SUFFIXES, OUTPUT_SUFFIXES


# -- paths --------------------------------------------------------------------------------------
def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Paths and globs (``data/*.csv``) -> existing files, in the order given (globs sorted)."""
    import glob

    files: list[Path] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?[") and not Path(pat).exists():
            matches = sorted(glob.glob(pat, recursive=True))
            if not matches:
                raise InputError(f"{pat}: no file matches")
            files += [Path(m) for m in matches]
        else:
            files.append(Path(pat))
    for f in files:
        if not f.is_file():
            raise InputError(f"{f}: no such file")
        if f.suffix.lower() not in INPUT_SUFFIXES:
            raise InputError(
                f"{f}: unsupported input type {f.suffix or '(none)'}; use .npy, .csv or .parquet"
            )
    if not files:
        raise InputError("no input files")
    return files


def side_files(output: Path) -> tuple[Path, Path]:
    """The rejects file and the JSON summary written beside ``output``."""
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(f"{stem}.rejects.csv"), output.with_name(f"{stem}.summary.json")


def check_output(output: Path, overwrite: bool) -> None:
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"{output}: unsupported output type; use .csv or .parquet")
    for path in (output, *side_files(output)):
        if path.exists() and not overwrite:
            raise InputError(f"{path} already exists; pass --overwrite to replace it")
    if output.exists() and output.is_dir():
        raise InputError(f"{output} is a directory")
