"""The Open Inference Protocol (KServe v2 REST) beside POST /score: metadata, readiness, infer
in JSON and binary tensors, its errors; and tritonclient, a client nobody here wrote, against the
live server."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from detector.detector import DetectionResult
from training.pipeline import TrainOutcome

COLUMNS = DetectionResult.COLUMNS
INFER = "/v2/models/vae-anomaly/infer"


def _tensor(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.ravel().tolist(),
        **extra,
    }


def _outputs(body: dict[str, Any]) -> dict[str, Any]:
    return {o["name"]: o for o in body["outputs"]}


def test_server_and_model_metadata_and_readiness(client: TestClient, trained: TrainOutcome) -> None:
    det = trained.detector
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "vae-anomaly" and "binary_tensor_data" in server["extensions"]
    meta = client.get("/v2/models/vae-anomaly").json()
    assert meta["versions"] == [det.model_version]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    names = [o["name"] for o in meta["outputs"]]
    assert names == list(COLUMNS)  # POST /score's results, in their order
    assert client.get(f"/v2/models/vae-anomaly/versions/{det.model_version}").status_code == 200
    assert client.get("/v2/models/vae-anomaly/ready").json() == {
        "name": "vae-anomaly",
        "ready": True,
    }
    r = client.get("/v2/models/other")
    assert r.status_code == 404 and "this server serves 'vae-anomaly'" in r.json()["error"]
    r = client.get("/v2/models/vae-anomaly/versions/v0/ready")
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = client.post(f"/v2/models/{'x' * 60_000}/infer", content=b"{}")  # not echoed back whole
    assert r.status_code == 404 and len(r.content) < 300
    assert "'xxxx" in r.json()["error"] and "(60000 characters)" in r.json()["error"]


def test_not_ready_before_a_model_is_loaded(make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client(load_from_dir=True, model_dir="/nonexistent/model")
    assert c.get("/v2/health/live").status_code == 200
    assert c.get("/v2/health/ready").status_code == 503
    assert c.get("/v2/models/vae-anomaly/ready").status_code == 503
    r = c.post(INFER, json={"inputs": [_tensor(np.zeros((1, 64), np.float32))]})
    assert r.status_code == 503 and set(r.json()) == {"error"}


def test_infer_equals_post_score(client: TestClient, test_images: np.ndarray) -> None:
    x = test_images[:7]
    want = client.post("/score", json={"instances": x.tolist()}).json()
    r = client.post(INFER, json={"id": "r1", "inputs": [_tensor(x)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "r1" and body["model_name"] == "vae-anomaly"
    assert body["model_version"] == want["model_version"]
    assert body["parameters"]["threshold"] == want["threshold"]
    out = _outputs(body)
    assert list(out) == list(COLUMNS)
    for name in COLUMNS:
        assert out[name]["shape"] == [7]
        assert out[name]["data"] == [row[name] for row in want["results"]], name
    assert out["is_anomaly"]["datatype"] == "BOOL" and out["score"]["datatype"] == "FP64"
    # nested data, FP64, the versioned route: the same scores
    nested = {
        "name": "input",
        "shape": [7, 1, 8, 8],
        "datatype": "FP64",
        "data": x.astype(np.float64).tolist(),
    }
    version = want["model_version"]
    r2 = client.post(f"/v2/models/vae-anomaly/versions/{version}/infer", json={"inputs": [nested]})
    assert _outputs(r2.json())["score"]["data"] == out["score"]["data"]


def test_requested_outputs_target_fpr_and_binary_tensors(
    client: TestClient, test_images: np.ndarray
) -> None:
    x = test_images[:5].astype(np.float32)
    plain = _outputs(client.post(INFER, json={"inputs": [_tensor(x)]}).json())
    req = {
        "parameters": {"target_fpr": 0.5},
        "inputs": [
            {
                "name": "input",
                "shape": [5, 64],
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        "outputs": [{"name": "score", "parameters": {"binary_data": True}}, {"name": "is_anomaly"}],
    }
    head = orjson.dumps(req)
    r = client.post(
        INFER,
        content=head + x.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    body = orjson.loads(r.content[:n])
    assert body["parameters"]["target_fpr"] == 0.5
    out = _outputs(body)
    assert list(out) == ["score", "is_anomaly"]
    scores = np.frombuffer(r.content[n:], dtype="<f8")
    assert out["score"]["parameters"]["binary_data_size"] == 40
    np.testing.assert_array_equal(scores, plain["score"]["data"])
    threshold = body["parameters"]["threshold"]
    assert out["is_anomaly"]["data"] == [bool(s > threshold) for s in scores]


@pytest.mark.parametrize(
    ("request_body", "status", "says"),
    [
        ({"inputs": []}, 400, "non-empty list"),
        (
            {
                "inputs": [
                    {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}
                ]
            },
            422,
            "unknown input 'pixels'",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "BYTES", "data": ["a"] * 64}
                ]
            },
            422,
            "datatype 'BYTES'",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 63}]},
            422,
            "holds 64 elements, data has 63",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0] * 63}]},
            422,
            "63",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, -64], "datatype": "FP32", "data": [0]}]},
            400,
            "non-negative integers",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [True] * 64}
                ]
            },
            422,
            "needs numbers",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [9.0] * 64}
                ]
            },
            422,
            "range",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}
                ],
                "outputs": [{"name": "loss"}],
            },
            400,
            "unknown output 'loss'",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}
                ],
                "parameters": {"target_fpr": 2},
            },
            422,
            "target_fpr",
        ),
        (
            {"inputs": [{"name": "input", "shape": [10**9, 64], "datatype": "FP32", "data": [0]}]},
            413,
            "limit",
        ),
    ],
)
def test_bad_tensors_get_a_4xx_in_the_protocols_form(
    client: TestClient, request_body: dict[str, Any], status: int, says: str
) -> None:
    r = client.post(INFER, json=request_body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and says in r.json()["error"]


def test_bad_binary_data_and_malformed_bodies(client: TestClient) -> None:
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    )
    cases = [
        (head + b"\0" * 100, len(head), "runs past the end"),
        (head + b"\0" * 300, len(head), "no input claims"),
        (head, len(head) + 5, "the body holds"),
        (b"{nope", None, "malformed JSON"),
    ]
    for body, n, says in cases:
        headers = {} if n is None else {"Inference-Header-Content-Length": str(n)}
        r = client.post(INFER, content=body, headers=headers)
        assert r.status_code == 400 and says in r.json()["error"], (says, r.text)
    r = client.get(INFER)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_api_key_and_metrics_and_openapi(make_client, test_images: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    c = make_client(api_key="k")
    body = {"inputs": [_tensor(test_images[:1])]}
    assert c.post(INFER, json=body).status_code == 401
    assert c.get("/v2/models/vae-anomaly").status_code == 401
    assert c.get("/v2/health/ready").status_code == 200  # probes need no key
    assert c.post(INFER, json=body, headers={"X-API-Key": "k"}).status_code == 200
    metrics = c.get("/metrics").text
    assert 'route="/v2/models/{name}/infer",status="200"' in metrics
    assert "vae_anomaly_scored_samples_total 1.0" in metrics
    paths = c.get("/openapi.json").json()["paths"]
    for p in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ):
        assert p in paths, p


def test_a_table_model_takes_one_input_per_column(table_client) -> None:  # type: ignore[no-untyped-def]
    meta = table_client.get("/v2/models/vae-anomaly").json()
    kinds = {i["name"]: i["datatype"] for i in meta["inputs"]}
    assert kinds == {"age": "FP64", "income": "FP64", "channel": "BYTES", "visits": "FP64"}
    assert [o["name"] for o in meta["outputs"]][-2:] == ["n_missing", "n_unseen"]
    records = [
        {"age": 41.0, "income": 3050.0, "channel": "web", "visits": 7.0},
        {"age": None, "income": 9000.0, "channel": "fax", "visits": 1.0},
    ]
    want = table_client.post("/score", json={"instances": records}).json()["results"]
    cols = ["age", "income", "channel", "visits"]
    inputs = [
        {"name": c, "shape": [2], "datatype": kinds[c], "data": [r[c] for r in records]}
        for c in cols
    ]
    out = _outputs(table_client.post(INFER, json={"inputs": inputs}).json())
    assert out["score"]["data"] == [r["score"] for r in want]
    assert out["n_missing"]["data"] == [0, 1] and out["n_unseen"]["data"] == [0, 1]
    # BYTES as binary: 4-byte little-endian lengths
    chan = b"".join(struct.pack("<I", len(s)) + s for s in (b"web", b"fax"))
    inputs[2] = {
        "name": "channel",
        "shape": [2],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": len(chan)},
    }
    head = orjson.dumps({"inputs": inputs})
    r = table_client.post(
        INFER, content=head + chan, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert _outputs(r.json())["score"]["data"] == out["score"]["data"]
    inputs[2] = {"name": "channel", "shape": [2], "datatype": "BYTES", "data": ["web", "fax"]}
    r = table_client.post(INFER, json={"inputs": inputs[:3]})
    assert r.status_code == 422 and "no input 'visits'" in r.json()["error"]
    bad = [dict(i) for i in inputs]
    bad[1] = {"name": "income", "shape": [2], "datatype": "BYTES", "data": ["lots", "1"]}
    r = table_client.post(
        INFER, json={"inputs": [bad[0], bad[1], *inputs[3:], {**inputs[2], "data": ["web", "fax"]}]}
    )
    assert r.status_code == 422 and "'lots' is not a number" in r.json()["error"]


@pytest.mark.slow
def test_tritonclient_against_the_live_server(trained: TrainOutcome, tmp_path: Path) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from tests.serving.live import LiveServer

    assert trained.path is not None and trained.split.x_test is not None
    x = trained.split.x_test[:6].astype(np.float32)
    with LiveServer(trained.path, "--model-name", "digits") as server:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits")
        meta = client.get_model_metadata("digits")
        assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
        assert client.get_server_metadata()["name"] == "vae-anomaly"

        import httpx

        want = httpx.post(f"{server.url}/score", json={"instances": x.tolist()}).json()["results"]
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # binary tensor data, tritonclient's default
        result = client.infer("digits", [inp])  # no outputs named: all, as binary
        np.testing.assert_array_equal(result.as_numpy("score"), [r["score"] for r in want])
        np.testing.assert_array_equal(
            result.as_numpy("is_anomaly"), [r["is_anomaly"] for r in want]
        )

        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        outs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("kl", "p_value")]
        result = client.infer("digits", [inp], outputs=outs, parameters={"target_fpr": 0.5})
        assert result.as_numpy("score") is None
        np.testing.assert_array_equal(result.as_numpy("kl"), [r["kl"] for r in want])
        assert result.get_response()["parameters"]["target_fpr"] == 0.5

        bad = httpclient.InferInput("input", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
        with pytest.raises(InferenceServerException, match="3"):
            client.infer("digits", [bad])
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.infer("vae-anomaly", [inp])
        client.close()


def test_binary_tensors_are_writable_arrays_torch_can_wrap() -> None:
    """A binary tensor's rows are copied out of the request body (a read-only buffer), so the
    torch runtime wraps them without the non-writable-array warning (an error under pytest)."""
    import torch

    from serving.app.v2_tensors import _from_binary

    raw = np.arange(6, dtype="<f4").tobytes()
    x = _from_binary(raw, "input", "FP32", 6)
    assert x.flags.writeable and x.flags.aligned
    assert torch.from_numpy(x).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
