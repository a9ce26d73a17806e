"""Property-based fuzzing (hypothesis) of what outsiders control: POST /score bodies, JSON and NPY,
and the CSV reader of batch scoring. Any input gets a 2xx or a 4xx JSON error, never a 500; every
CSV row is scored or reported as rejected."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.errors import DataError, InputError
from serving.batch import BatchOptions, score_files
from training.pipeline import TrainOutcome

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

FUZZ = settings(
    max_examples=int(os.environ.get("VAE_ANOMALY_FUZZ_EXAMPLES", "120")),  # more: a longer hunt
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=40,
)
# instances shaped like the model's input (64 values), with values anywhere
instances = st.lists(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=64, max_size=64),
    min_size=1,
    max_size=4,
)


def _check(r) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code < 500, r.text
    body = r.json()
    if r.status_code >= 400:
        assert set(body) == {"error", "detail", "request_id"}, body
    else:
        assert len(body["results"]) >= 1


@FUZZ
@given(
    body=st.one_of(
        json_values.map(lambda v: {"instances": v}),
        json_values,
        instances.map(lambda v: {"instances": v}),
    )
)
def test_any_json_body_gets_an_answer_not_a_500(client: TestClient, body: object) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    _check(client.post("/score", content=raw, headers={"content-type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_any_bytes_as_json_or_npy_get_an_answer(client: TestClient, raw: bytes) -> None:
    for ctype in ("application/json", "application/x-npy"):
        _check(client.post("/score", content=raw, headers={"content-type": ctype}))


@FUZZ
@given(
    dtype=st.sampled_from(["<f4", "<f8", ">f4", "<i8", "|u1", "|b1", "<c8", "<U3", "<M8[s]"]),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3),
)
def test_any_npy_array_or_a_damaged_one_gets_an_answer(
    client: TestClient, dtype: str, shape: tuple[int, ...], flips: list[tuple[int, int]]
) -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=dtype), allow_pickle=False)
    raw = bytearray(buf.getvalue())
    for pos, value in flips:  # damage the header or the data
        if pos < len(raw):
            raw[pos] = value
    _check(client.post("/score", content=bytes(raw), headers={"content-type": "application/x-npy"}))


cells = st.one_of(
    st.floats(0, 16).map(lambda v: f"{v:.3f}"),
    st.integers(-5, 40).map(str),
    st.sampled_from(["", "nan", "inf", "x", "1e400", '"3"', " 2 ", "caf\u00e9"]),
)


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.lists(cells, min_size=64, max_size=64).map(",".join),
            st.lists(cells, min_size=0, max_size=70).map(",".join),
            st.just(""),
        ),
        min_size=1,
        max_size=12,
    ),
    header=st.booleans(),
    bom=st.booleans(),
)
def test_every_csv_row_is_scored_or_rejected(
    trained: TrainOutcome, tmp_path: Path, lines: list[str], header: bool, bom: bool
) -> None:
    text = "\n".join(lines) + "\n"
    if header:
        text = ",".join(f"p{j}" for j in range(64)) + "\n" + text
    src = tmp_path / "in.csv"
    src.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    out = tmp_path / "out.csv"
    for p in tmp_path.glob("out*"):
        p.unlink()
    try:
        s = score_files(trained.detector, [src], out, BatchOptions(scale=16, on_error="skip"))
    except (DataError, InputError):
        assert not out.exists()  # a file refused whole leaves nothing
        return
    data_lines = [ln for ln in lines if ln.strip()]
    first = next(csv.reader([data_lines[0]])) if data_lines else []
    if not header and data_lines and not all(_is_number(c) for c in first if c.strip()):
        data_lines = data_lines[1:]  # a first line with a cell that is not a number is a header
    assert s.rows + s.rejected == len(data_lines)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


@pytest.fixture
def client(make_client) -> TestClient:  # type: ignore[no-untyped-def]
    return make_client(max_instances=50)  # type: ignore[no-any-return]
