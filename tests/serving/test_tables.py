"""Tables as a first-class input: columns by name, categories, missing cells, finite numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

from detector.detector import Detector
from detector.errors import DataError, InputError
from detector.schema import CATEGORICAL, NUMERIC, TableSchema
from serving.batch import BatchOptions, score_files
from tests.serving.conftest import _table
from training.data import TableOptions, load_table
from vae_anomaly.cli import main


def _score(model: Path, src: Path, out: Path, **opts: object) -> pd.DataFrame:
    det = Detector.load(model)
    score_files(det, [src], out, BatchOptions(overwrite=True, **opts))  # type: ignore[arg-type]
    return pd.read_csv(out)


def test_schema_saved_with_kinds_and_categories(table_model: tuple[Path, Path]) -> None:
    schema = Detector.load(table_model[0]).input_spec.schema
    assert schema is not None and schema.by_name
    kinds = {c.name: c.kind for c in schema.columns}
    assert kinds == {"age": NUMERIC, "income": NUMERIC, "channel": CATEGORICAL, "visits": NUMERIC}
    channel = next(c for c in schema.columns if c.name == "channel")
    assert sorted(channel.categories) == ["phone", "store", "web"]
    assert schema.n_encoded == 6


def test_reordered_columns_score_identically(table_model: tuple[Path, Path]) -> None:
    model, root = table_model
    df = _table(300, seed=1)
    df.to_csv(root / "a.csv", index=False)
    df[["visits", "channel", "income", "age"]].to_csv(root / "b.csv", index=False)
    df[["channel", "age", "visits", "income"]].to_parquet(root / "c.parquet")
    a = _score(model, root / "a.csv", root / "a_out.csv")
    b = _score(model, root / "b.csv", root / "b_out.csv")
    c = _score(model, root / "c.parquet", root / "c_out.csv")
    assert len(a) == 300
    np.testing.assert_array_equal(a["score"], b["score"])
    np.testing.assert_array_equal(a["score"], c["score"])
    assert np.isfinite(a["score"]).all()
    # missing cells are counted per row, and scored (neither refused nor zeros)
    np.testing.assert_array_equal(a["n_missing"], df.isna().sum(axis=1).to_numpy())


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (["age", "income", "channel"], "missing column 'visits'"),
        (["age", "income", "channel", "visits", "colour"], "unknown column 'colour'"),
    ],
)
def test_missing_or_unknown_column_is_refused(
    table_model: tuple[Path, Path], columns: list[str], message: str
) -> None:
    model, root = table_model
    df = _table(20, seed=2).assign(colour="red")[columns]
    df.to_csv(root / "bad.csv", index=False)
    with pytest.raises(InputError, match=message):
        _score(model, root / "bad.csv", root / "bad_out.csv")
    assert not (root / "bad_out.csv").exists()


def test_unknown_column_passes_through_when_named(table_model: tuple[Path, Path]) -> None:
    model, root = table_model
    _table(20, seed=2).assign(colour="red").to_csv(root / "extra.csv", index=False)
    out = _score(model, root / "extra.csv", root / "extra_out.csv", passthrough=("colour",))
    assert (out["colour"] == "red").all() and len(out) == 20


def test_retyped_column_names_the_column(table_model: tuple[Path, Path]) -> None:
    model, root = table_model
    df = _table(20, seed=3)
    df["income"] = df["income"].astype(object)
    df.loc[4, "income"] = "high"
    df.to_csv(root / "retyped.csv", index=False)
    with pytest.raises(DataError, match=r"line 6: column 'income': 'high' is not a number"):
        _score(model, root / "retyped.csv", root / "retyped_out.csv")
    out = _score(model, root / "retyped.csv", root / "retyped_out.csv", on_error="skip")
    assert len(out) == 19
    rejects = pd.read_csv(root / "retyped_out.rejects.csv")
    assert rejects["where"].tolist() == ["line 6"]


def test_unseen_category_and_all_missing_rows(table_model: tuple[Path, Path]) -> None:
    model, root = table_model
    det = Detector.load(model)
    schema = det.input_spec.schema
    assert schema is not None
    text = "age,income,channel,visits\n41,3100,fax,3\n,,,\n41,3100,web,3\n"
    (root / "odd.csv").write_text(text)
    out = _score(model, root / "odd.csv", root / "odd_out.csv")
    assert out["n_unseen"].tolist() == [1, 0, 0]
    assert out["n_missing"].tolist() == [0, 4, 0]
    assert np.isfinite(out["score"]).all()
    # a row of missing cells counts each column's typical term (not 0: rows with unknown cells
    # must not look more normal for it)
    typical = float(det.model.missing_nats.sum())
    assert math.isclose(out["reconstruction"][1], typical, rel_tol=1e-5)
    # an unseen category costs log(n + 1) nats in the likelihood, a seen one its surprise
    assert math.isclose(schema.unseen_nats, math.log(800 + 1))


def test_absurd_values_are_rejected_never_infinite(table_model: tuple[Path, Path]) -> None:
    model, root = table_model
    text = "age,income,channel,visits\n41,1e30,web,3\n41,3100,web,3\n40,-inf,web,2\n"
    (root / "huge.csv").write_text(text)
    with pytest.raises(DataError, match=r"line 2: column 'income': 1e\+30 is more than 1e\+06"):
        _score(model, root / "huge.csv", root / "huge_out.csv")
    out = _score(model, root / "huge.csv", root / "huge_out.csv", on_error="skip")
    assert len(out) == 1 and np.isfinite(out.select_dtypes("number").to_numpy()).all()
    det = Detector.load(model)
    x = np.array([[41.0, 1e30, 0.0, 1.0, 0.0, 3.0]], np.float32)
    with pytest.raises(InputError, match="column 'income'"):
        det.score(x)


def test_semicolon_file_and_delimiter_are_sniffed(table_model: tuple[Path, Path]) -> None:
    model, root = table_model
    df = _table(50, seed=4)
    df.to_csv(root / "comma.csv", index=False)
    df.to_csv(root / "semi.csv", index=False, sep=";")
    a = _score(model, root / "comma.csv", root / "comma_out.csv")
    b = _score(model, root / "semi.csv", root / "semi_out.csv")
    np.testing.assert_array_equal(a["score"], b["score"])


def test_categorical_surprise_is_the_softmax_surprise(table_model: tuple[Path, Path]) -> None:
    det = Detector.load(table_model[0])
    schema = det.input_spec.schema
    assert schema is not None
    x = torch.tensor([[41.0, 3100.0, 0.0, 1.0, 0.0, 3.0]])  # channel: the second category
    model = det.model
    with torch.no_grad():
        mu, _ = model.encode(x)
        params = model.decode(mu)
        terms = model.nll_features(x, params)
        start, size = schema.categorical_groups[0]
        # a table's default is a seed ensemble: its surprise is the members' mean
        assert params.shape == (1, model.config.members, x.shape[1])
        expected = -torch.log_softmax(params[0, :, start : start + size], -1)[:, 1].mean()
    assert torch.isclose(terms[0, start], expected)
    assert (terms[0, start + 1 : start + size] == 0).all()
    assert torch.isclose(terms.sum(), model.nll(x, params)[0])


def test_text_codes_as_categories_and_drop(tmp_path: Path) -> None:
    df = _table(120).assign(customer_id=np.arange(120), segment=np.arange(120) % 4)
    df.to_csv(tmp_path / "t.csv", index=False)
    ds = load_table(
        tmp_path / "t.csv", TableOptions(categorical=("segment",), drop=("customer_id",))
    )
    assert ds.schema is not None
    kinds = {c.name: c.kind for c in ds.schema.columns}
    assert "customer_id" not in kinds and kinds["segment"] == CATEGORICAL
    assert ds.x_train.shape == (120, 6 + 4)
    with pytest.raises(InputError, match="--drop names no column 'nope'"):
        load_table(tmp_path / "t.csv", TableOptions(drop=("nope",)))


def test_a_stray_word_in_a_number_column_is_named(tmp_path: Path) -> None:
    df = _table(120)
    df["income"] = df["income"].astype(object)
    df.loc[7, "income"] = "n/a?"
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"line 9, column 'income': 'n/a\?' is not a number"):
        load_table(tmp_path / "t.csv")


def test_headerless_table_takes_columns_by_position(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    np.savetxt(tmp_path / "n.csv", x, delimiter=",")
    ds = load_table(tmp_path / "n.csv")
    assert ds.schema is not None and not ds.schema.by_name
    assert [c.name for c in ds.schema.columns] == ["0", "1", "2"]
    with pytest.raises(InputError, match="2 feature columns, but the model takes 3"):
        ds.schema.match(["a", "b"], "f.csv")


def test_schema_round_trip_and_bounds() -> None:
    table = pacsv.read_csv(
        pa.BufferReader(b"a,b\n1,x\n2,y\n3,\n"),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
    )
    schema = TableSchema.infer(table)
    again = TableSchema.from_dict(schema.to_dict())
    assert again == schema
    enc = schema.encode([table.column("a"), table.column("b")])
    assert enc.missing.tolist() == [0, 0, 1]
    assert np.isnan(enc.x[2, 1:]).all()


def test_cli_trains_a_table_with_defaults(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _table(300).to_csv(tmp_path / "n.csv", index=False)
    code = main(
        [
            "train",
            "--dataset",
            str(tmp_path / "n.csv"),
            "--out",
            str(tmp_path / "m"),
            "--epochs",
            "2",
            "--min-steps",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "table: 4 columns (3 numeric, 1 categorical), matched by name" in capsys.readouterr().out


def test_http_records_by_name_with_missing_and_explanations(
    table_model: tuple[Path, Path],
    table_client,  # type: ignore[no-untyped-def]
) -> None:
    model, root = table_model
    rows = [
        {"visits": 3, "channel": "web", "income": 3100.0, "age": 41},
        {"age": None, "income": None, "channel": None, "visits": None},
        {"channel": "fax", "age": 41, "income": 3100.0, "visits": 3},
    ]
    r = table_client.post("/score?explain=true", json={"instances": rows})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["n_missing"] for x in res] == [0, 4, 0]
    assert [x["n_unseen"] for x in res] == [0, 0, 1]
    assert set(res[0]["contributions"]) == {"age", "income", "channel", "visits"}
    assert res[2]["top_columns"][0] == "channel"  # the unseen category explains the row
    # the same rows through batch scoring score the same
    pd.DataFrame(rows).to_csv(root / "http.csv", index=False)
    batch = _score(model, root / "http.csv", root / "http_out.csv")
    np.testing.assert_allclose([x["score"] for x in res], batch["score"], rtol=1e-6)


@pytest.mark.parametrize(
    ("instance", "message"),
    [
        ({"age": 41, "income": 3100, "channel": "web"}, "instance 0: no column 'visits'"),
        (
            {"age": 41, "income": 3100, "channel": "web", "visits": 3, "x": 1},
            "instance 0: unknown column 'x'",
        ),
        (
            {"age": "old", "income": 3100, "channel": "web", "visits": 3},
            "instance 0, column 'age': 'old' is not a number",
        ),
        (
            {"age": 41, "income": 1e30, "channel": "web", "visits": 3},
            "instance 0: column 'income': 1e+30 is more than",
        ),
        ({"age": True, "income": 1, "channel": "web", "visits": 3}, "expected a number"),
    ],
)
def test_http_bad_records_are_4xx_naming_the_column(
    table_client,
    instance: dict,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    r = table_client.post("/score", json={"instances": [instance]})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_openapi_describes_records(table_client) -> None:  # type: ignore[no-untyped-def]
    doc = table_client.get("/openapi.json").json()
    body = doc["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]
    record = body["schema"]["properties"]["instances"]["items"]
    assert record["required"] == ["age", "income", "channel", "visits"]


def test_batch_explain_names_the_columns(table_model: tuple[Path, Path]) -> None:
    model, root = table_model
    text = "age,income,channel,visits\n41,3100,fax,3\n41,9100,web,3\n41,3100,web,3\n"
    (root / "explain.csv").write_text(text)
    out = _score(model, root / "explain.csv", root / "explain_out.csv", explain=True)
    assert out["top_columns"][0].split(";")[0] == "channel"
    # an income far from what age predicts: the pair that disagrees leads
    assert set(out["top_columns"][1].split(";")[:2]) == {"income", "age"}
    parts = out[[f"contribution.{c}" for c in ("age", "income", "channel", "visits")]]
    assert (parts.to_numpy() >= 0).all()


def test_explain_needs_a_table_model(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    with pytest.raises(InputError, match="--explain needs a model trained on a table"):
        score_files(
            trained.detector, [tmp_path / "x.npy"], tmp_path / "o.csv", BatchOptions(explain=True)
        )


def test_report_has_a_tabular_mode(table_model: tuple[Path, Path], tmp_path: Path) -> None:
    from training.report import build

    det = Detector.load(table_model[0])
    df = _table(60, seed=5)
    df.loc[:9, "income"] = 20000.0  # ten rows far off: they lead the most-anomalous heat map
    df.to_csv(tmp_path / "r.csv", index=False)
    from training.data import load_table_rows

    x, _ = load_table_rows(tmp_path / "r.csv", det.input_spec.schema)  # type: ignore[arg-type]
    y = np.r_[np.ones(10), np.zeros(50)]
    rep = build(det, x, tmp_path / "rep", is_anomaly=y)
    names = {p.name for p in rep.figures}
    assert {"score_distribution.png", "most_anomalous.png", "most_normal.png"} <= names
    assert "prior_samples.png" in rep.skipped and "latent_interpolation.png" in rep.skipped


def test_an_infinite_score_is_never_written(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An image model without a value range (a .npy of images) can overflow on absurd values:
    the row is rejected, never written as inf."""
    from serving.batch import writer
    from serving.batch.options import Block, RowError

    det = trained.detector
    x = np.full((3, 64), 0.5, np.float32)
    block = Block("f.npy", np.arange(3), x)
    parts = det.score_validated(x.reshape(3, *det.input_spec.shape))
    parts["score"][1] = np.inf  # what an overflow gives
    with pytest.raises(RowError, match=r"f\.npy, row 1: the score is not a finite number"):
        writer._drop_infinite(block, parts, np.isfinite(parts["score"]), None)
    seen: list[tuple[str, str, str]] = []

    class Collect:
        def add(self, *a: str) -> None:
            seen.append(a)

    kept, kept_parts = writer._drop_infinite(block, parts, np.isfinite(parts["score"]), Collect())
    assert kept.rows.tolist() == [0, 2] and np.isfinite(kept_parts["score"]).all()
    assert seen == [("f.npy", "row 1", writer.INFINITE)]


def test_a_categorical_column_now_numbers_is_refused(table_model: tuple[Path, Path]) -> None:
    model, root = table_model
    df = _table(40, seed=6)
    df["channel"] = np.arange(40) % 3  # codes where the model learnt words
    df.to_csv(root / "codes.csv", index=False)
    with pytest.raises(InputError, match="column 'channel' holds numbers, but the model learnt"):
        _score(model, root / "codes.csv", root / "codes_out.csv")


def test_a_header_longer_than_the_sniffed_bytes(tmp_path: Path) -> None:
    from detector.tables import sniff_csv

    p = tmp_path / "wide.csv"
    p.write_text(",".join(f"col{i}" for i in range(20000)) + "\n" + ",".join("1" * 20000) + "\n")
    layout = sniff_csv(p)
    assert layout.header and len(layout.names) == 20000 and layout.delimiter == ","
