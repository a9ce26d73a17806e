"""The HTTP API through FastAPI's TestClient: every endpoint and every bad-input case."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from training.pipeline import TrainOutcome


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _error(r, status: int, code: str, detail: str) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code
    assert detail in body["detail"], body["detail"]
    assert body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text


def test_health_ready_metadata(client: TestClient, trained: TrainOutcome) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["model_version"] == trained.detector.model_version
    meta = client.get("/metadata").json()
    assert meta["input"]["shape"] == [1, 8, 8]
    assert meta["threshold"] == trained.detector.threshold
    assert meta["target_fpr"] == 0.05 and meta["n_calibration"] == trained.detector.calibration.n  # type: ignore[union-attr]
    assert "higher = more anomalous" in meta["score_definition"]
    assert meta["serving"]["max_batch_size"] == 64
    score_doc = client.get("/openapi.json").json()["paths"]["/score"]["post"]
    assert [p["name"] for p in score_doc["parameters"]] == ["explain", "clip", "target_fpr"]
    assert set(score_doc["requestBody"]["content"]) == {"application/json", "application/x-npy"}
    assert {"200", "401", "413", "415", "422", "503"} <= set(score_doc["responses"])


def test_readyz_is_503_without_a_model(make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client(load_from_dir=True, model_dir="/nonexistent/model")
    deadline = time.monotonic() + 10
    while "failed" not in c.get("/readyz").json().get("detail", "") and time.monotonic() < deadline:
        time.sleep(0.05)
    r = c.get("/readyz")
    assert r.status_code == 503 and "model failed to load" in r.json()["detail"]
    assert c.get("/healthz").status_code == 200
    _error(
        c.post("/score", json={"instances": [[0.0] * 64]}),
        503,
        "model_not_ready",
        "model failed to load",
    )


def test_model_loads_from_dir_then_ready(make_client, trained: TrainOutcome) -> None:  # type: ignore[no-untyped-def]
    c = make_client(load_from_dir=True)
    deadline = time.monotonic() + 20
    while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.get("/readyz").json()["model_version"] == trained.detector.model_version


def test_score_json_matches_offline_detector(
    client: TestClient, trained: TrainOutcome, test_images: np.ndarray
) -> None:
    x = test_images[:20]
    ref = trained.detector.score(x)
    for payload in (x.reshape(20, -1).tolist(), x.tolist(), x.reshape(20, 8, 8).tolist()):
        r = client.post("/score", json={"instances": payload})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == trained.detector.model_version
        assert body["threshold"] == trained.detector.threshold and body["target_fpr"] == 0.05
        res = body["results"]
        assert len(res) == 20 and set(res[0]) == {
            "score",
            "reconstruction",
            "kl",
            "complexity",
            "neighbour",
            "transformation",
            "p_value",
            "is_anomaly",
        }
        np.testing.assert_allclose([d["score"] for d in res], ref.score, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose([d["p_value"] for d in res], ref.p_value)
        assert [d["is_anomaly"] for d in res] == ref.is_anomaly.tolist()


@pytest.mark.parametrize("ctype", ["application/x-npy", "application/octet-stream"])
def test_score_npy_body(
    client: TestClient, trained: TrainOutcome, test_images: np.ndarray, ctype: str
) -> None:
    r = client.post("/score", content=_npy(test_images[:50]), headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        [d["score"] for d in r.json()["results"]],
        trained.detector.score(test_images[:50]).score,
        rtol=1e-5,
        atol=1e-4,
    )


def test_explain_returns_per_feature_errors(client: TestClient, test_images: np.ndarray) -> None:
    r = client.post("/score?explain=true", json={"instances": test_images[:2].tolist()})
    res = r.json()["results"]
    assert len(res[0]["feature_errors"]) == 64 and min(res[0]["feature_errors"]) >= 0


def test_target_fpr_override(client: TestClient, test_images: np.ndarray) -> None:
    base = client.post("/score", json={"instances": test_images[:30].tolist()}).json()
    loose = client.post(
        "/score?target_fpr=0.5", json={"instances": test_images[:30].tolist()}
    ).json()
    assert loose["target_fpr"] == 0.5 and loose["threshold"] < base["threshold"]
    assert sum(d["is_anomaly"] for d in loose["results"]) >= sum(
        d["is_anomaly"] for d in base["results"]
    )
    _error(
        client.post("/score?target_fpr=2", json={"instances": test_images[:1].tolist()}),
        422,
        "invalid_parameter",
        "target_fpr",
    )
    _error(
        client.post("/score?target_fpr=abc", json={"instances": test_images[:1].tolist()}),
        422,
        "invalid_parameter",
        "target_fpr",
    )
    _error(
        client.post("/score?target_fpr=0.001", json={"instances": test_images[:1].tolist()}),
        422,
        "invalid_parameter",
        "below 1/n",
    )


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("explain=maybe", "explain: expected true or false, got 'maybe'"),
        ("clip=2", "clip: expected true or false, got '2'"),
        ("target_fpr=", "target_fpr: expected a number between 0 and 1"),
        ("target_fpr=nan", "target_fpr: expected a number between 0 and 1"),
        ("target_fpr=0", "target_fpr: expected a number between 0 and 1"),
    ],
)
def test_bad_query_parameters(client: TestClient, query: str, detail: str) -> None:
    _error(
        client.post(f"/score?{query}", json={"instances": [[0.0] * 64]}),
        422,
        "invalid_parameter",
        detail,
    )


@pytest.mark.parametrize("value", ["true", "True", "1", "yes", "on"])
def test_boolean_query_spellings(client: TestClient, value: str) -> None:
    r = client.post(f"/score?explain={value}", json={"instances": [[0.0] * 64]})
    assert r.status_code == 200 and len(r.json()["results"][0]["feature_errors"]) == 64
    r = client.post("/score?explain=off", json={"instances": [[0.0] * 64]})
    assert r.status_code == 200 and "feature_errors" not in r.json()["results"][0]


def test_out_of_range_rejected_or_clipped(client: TestClient) -> None:
    x = [[2.0] * 64]
    _error(
        client.post("/score", json={"instances": x}),
        422,
        "invalid_input",
        "outside the model's input range [0, 1]",
    )
    r = client.post("/score?clip=true", json={"instances": x})
    assert r.status_code == 200
    assert (
        r.json()["results"][0]["score"]
        == client.post("/score", json={"instances": [[1.0] * 64]}).json()["results"][0]["score"]
    )


@pytest.mark.parametrize(
    ("body", "status", "code", "detail"),
    [
        (b"{not json", 400, "bad_request", "malformed JSON"),
        (b"[1, 2]", 422, "invalid_input", 'must be an object with an "instances" list'),
        (b'{"data": [[0.0]]}', 422, "invalid_input", 'must be an object with an "instances" list'),
        (b'{"instances": 5}', 422, "invalid_input", '"instances" must be a list, got int'),
        (b'{"instances": []}', 422, "invalid_input", '"instances" is empty'),
        (b'{"instances": [1, 2, 3]}', 422, "invalid_input", "not a scalar"),
        (
            json.dumps({"instances": [[0.0] * 10]}).encode(),
            422,
            "invalid_input",
            "has 10 features per sample (shape (1, 10)), but the model is expecting 64",
        ),
        (
            json.dumps({"instances": [[0.0] * 64, [0.0] * 63]}).encode(),
            422,
            "invalid_input",
            "same shape",
        ),
        (
            b'{"instances": [[NaN' + b", 0.0" * 63 + b"]]}",
            422,
            "invalid_input",
            "NaN or infinite values in 1 sample(s), first at index 0",
        ),
        (
            b'{"instances": [[0.0, Infinity' + b", 0.0" * 62 + b"]]}",
            422,
            "invalid_input",
            "NaN or infinite",
        ),
        (
            json.dumps({"instances": [["0.5"] * 64]}).encode(),
            422,
            "invalid_input",
            "must hold numbers only",
        ),
        (
            json.dumps({"instances": [[True] * 64]}).encode(),
            422,
            "invalid_input",
            "must hold numbers only",
        ),
        (
            json.dumps({"instances": [[None] * 64]}).encode(),
            422,
            "invalid_input",
            "must hold numbers only",
        ),
        (b"", 400, "bad_request", "empty body"),
        # true / false are not numbers, even mixed with numbers (numpy would make them 1 and 0)
        (
            json.dumps({"instances": [[True] + [0.0] * 63]}).encode(),
            422,
            "invalid_input",
            "numbers only (got true / false)",
        ),
        # nesting beyond the parser's depth, with or without a NaN literal (the second parser)
        (b"[" * 100_000 + b"]" * 100_000, 400, "bad_request", "malformed JSON"),
        (
            b'{"instances": ' + b"[" * 5000 + b"0" + b"]" * 5000 + b"}",
            400,
            "bad_request",
            "malformed JSON",
        ),
        (b'{"a":' * 50_000 + b"NaN" + b"}" * 50_000, 400, "bad_request", "malformed JSON"),
        # nesting the parser accepts, but no array has
        (
            b'{"instances": ' + b"[" * 500 + b"0" + b"]" * 500 + b"}",
            422,
            "invalid_input",
            "same shape",
        ),
        # an integer longer than any number type (and Python's int-string limit)
        (b'{"instances": [[' + b"9" * 5000 + b"]]}", 400, "bad_request", "malformed JSON"),
        (b'{"instances": [[NaN, ' + b"9" * 5000 + b"]]}", 400, "bad_request", "malformed JSON"),
    ],
)
def test_bad_json_bodies(
    client: TestClient, body: bytes, status: int, code: str, detail: str
) -> None:
    _error(
        client.post("/score", content=body, headers={"content-type": "application/json"}),
        status,
        code,
        detail,
    )


def test_bad_npy_bodies(client: TestClient) -> None:
    npy = {"content-type": "application/x-npy"}
    _error(
        client.post("/score", content=b"not an npy file", headers=npy),
        400,
        "bad_request",
        "not a valid NPY array",
    )
    _error(
        client.post("/score", content=_npy(np.zeros(64)), headers=npy),
        422,
        "invalid_input",
        "expected an array of instances",
    )
    _error(
        client.post("/score", content=_npy(np.array([["a"] * 64])), headers=npy),
        422,
        "invalid_input",
        "numbers only",
    )
    _error(
        client.post("/score", content=_npy(np.array([[None] * 64], dtype=object)), headers=npy),
        400,
        "bad_request",
        "not a valid NPY array",
    )
    _error(
        client.post("/score", content=_npy(np.full((2, 64), np.nan)), headers=npy),
        422,
        "invalid_input",
        "NaN",
    )


def test_npy_headers_are_checked_before_anything_is_allocated(client: TestClient) -> None:
    npy = {"content-type": "application/x-npy"}
    for shape in ((10**12, 784), (10**8, 784), (3, 64)):
        header = {"descr": "<f4", "fortran_order": False, "shape": shape}
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, header)
        body = buf.getvalue() + b"\x00" * 64  # 64 bytes of data, whatever the header says
        r = client.post("/score", content=body, headers=npy)
        if shape[0] > 10_000:  # more instances than the limit: refused on the header alone
            _error(r, 413, "payload_too_large", "instances in one request")
        else:
            _error(r, 400, "bad_request", "but the body holds 64 bytes of data")
    # an .npz archive or anything else that is not one NPY array
    archive = io.BytesIO()
    np.savez(archive, x=np.zeros((2, 64), np.float32))
    for body, detail in (
        (archive.getvalue(), "a .npz archive? send one .npy array"),
        (b"PK\x03\x04" + b"garbage" * 10, "does not start with the NPY magic"),
    ):
        _error(client.post("/score", content=body, headers=npy), 400, "bad_request", detail)


def test_unsupported_content_type(client: TestClient) -> None:
    _error(
        client.post("/score", content=b"a,b", headers={"content-type": "text/csv"}),
        415,
        "unsupported_media_type",
        "'text/csv' is not supported",
    )


def test_limits(make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client(max_instances=5, max_body_bytes=4096)
    _error(
        c.post("/score", json={"instances": [[0.0] * 64] * 6}),
        413,
        "payload_too_large",
        "6 instances in one request; the limit is 5",
    )
    _error(
        c.post(
            "/score",
            content=_npy(np.zeros((6, 64), np.float32)),
            headers={"content-type": "application/x-npy"},
        ),
        413,
        "payload_too_large",
        "the limit is 5",
    )
    big = json.dumps({"instances": [[0.123456789] * 64] * 5}).encode()
    assert len(big) > 4096
    r = c.post("/score", content=big, headers={"content-type": "application/json"})
    _error(r, 413, "payload_too_large", "larger than the limit of 4096 bytes")

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = c.post("/score", content=chunks(), headers={"content-type": "application/json"})
    _error(r, 413, "payload_too_large", "larger than the limit of 4096 bytes")


def test_api_key(make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client(api_key="s3cret")
    x = {"instances": [[0.0] * 64]}
    _error(c.post("/score", json=x), 401, "unauthorized", "X-API-Key")
    _error(
        c.post("/score", json=x, headers={"x-api-key": "wrong"}), 401, "unauthorized", "X-API-Key"
    )
    _error(c.get("/metadata"), 401, "unauthorized", "X-API-Key")
    assert c.post("/score", json=x, headers={"x-api-key": "s3cret"}).status_code == 200
    assert (
        c.get("/healthz").status_code
        == c.get("/readyz").status_code
        == c.get("/metrics").status_code
        == 200
    )


def test_unknown_route_and_method(client: TestClient) -> None:
    _error(client.get("/nope"), 404, "not_found", "Not Found")
    r = client.get("/score")
    _error(r, 405, "method_not_allowed", "Method Not Allowed")
    assert r.headers["allow"] == "POST"


def test_client_gone_before_the_body_is_counted_as_499_not_500(client: TestClient) -> None:
    """A client that disconnects mid-request gets no response, and the request is counted with
    status 499 (client closed request), so it never shows up as a server error."""
    sent: list[dict] = []  # type: ignore[type-arg]

    async def receive() -> dict:  # type: ignore[type-arg]
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:  # type: ignore[type-arg]
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/score",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    assert sent == []
    text = client.get("/metrics").text
    assert 'vae_anomaly_requests_total{method="POST",route="/score",status="499"} 1.0' in text
    assert 'status="500"' not in text


def test_internal_error_is_a_generic_500(
    make_client,
    trained: TrainOutcome,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # type: ignore[no-untyped-def]
    c = make_client(raise_server_exceptions=False)

    def boom(x: np.ndarray) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(trained.detector, "score_validated", boom)
    r = c.post("/score", json={"instances": [[0.0] * 64]}, headers={"x-request-id": "req-123"})
    assert r.status_code == 500
    assert r.json() == {
        "error": "internal_error",
        "detail": "internal error; quote request id req-123 when reporting it",
        "request_id": "req-123",
    }
    assert "secret internal detail" not in r.text
    assert any("req-123" in rec.getMessage() for rec in caplog.records)


def test_admin_reload_is_off_by_default(client: TestClient) -> None:
    _error(client.post("/admin/reload"), 404, "not_found", "disabled")


def test_metrics_exposition(
    client: TestClient, test_images: np.ndarray, trained: TrainOutcome
) -> None:
    client.post("/score", json={"instances": test_images[:10].tolist()})
    client.post("/score", json={"instances": [[0.0] * 3]})
    text = client.get("/metrics").text
    flagged = int(trained.detector.score(test_images[:10]).is_anomaly.sum())
    expected = [
        'vae_anomaly_requests_total{method="POST",route="/score",status="200"} 1.0',
        'vae_anomaly_requests_total{method="POST",route="/score",status="422"} 1.0',
        "vae_anomaly_scored_samples_total 10.0",
        f"vae_anomaly_anomalies_total {float(flagged)}",
        "vae_anomaly_score_count 10.0",
        "vae_anomaly_batch_size_count 1.0",
        "vae_anomaly_inference_duration_seconds_count 1.0",
        f"vae_anomaly_threshold {trained.detector.threshold}",
        "vae_anomaly_target_fpr 0.05",
        f'vae_anomaly_model_info{{model_version="{trained.detector.model_version}"}} 1.0',
        "vae_anomaly_in_flight_requests 1.0",  # the /metrics request itself
        'vae_anomaly_model_reloads_total{result="failure"} 0.0',
    ]
    for line in expected:
        assert line in text, line
    assert (
        'vae_anomaly_request_duration_seconds_bucket{le="0.005",method="POST",route="/score"}'
        in text
    )


def test_405_says_what_is_allowed_and_the_schema_says_what_is_answered(
    client: TestClient,
) -> None:
    for method, url, allow in (
        ("POST", "/healthz", "GET"),
        ("POST", "/metrics", "GET"),
        ("DELETE", "/metadata", "GET"),
        ("GET", "/score", "POST"),
    ):
        r = client.request(method, url)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, url)
        assert r.json()["error"] == "method_not_allowed"
    doc = client.get("/openapi.json").json()
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == [
        "text/plain; version=0.0.4"
    ]
    body = doc["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for form in body["properties"]["instances"]["oneOf"]:
        assert form["minItems"] == 1  # [] answers 422, as documented
    assert {"401", "403", "404", "409"} <= set(doc["paths"]["/admin/reload"]["post"]["responses"])


def test_metadata_tells_no_server_paths(trained: TrainOutcome) -> None:
    from prometheus_client import CollectorRegistry

    from detector.detector import Detector
    from serving.app import create_app
    from serving.settings import Settings

    det = trained.detector
    leaky = Detector(
        det.model,
        det.calibration,
        det.input_spec,
        reference=det.reference,
        head=det.head,
        metadata={
            "config": {
                "data": {"dataset": "file", "source": "/home/alice/secret/normal.csv"},
                "training": {"data_options": {"data_dir": "/srv/cache/vae-anomaly"}},
            }
        },
    )
    app = create_app(Settings(access_log=False), detector=leaky, registry=CollectorRegistry())
    with TestClient(app) as c:
        text = c.get("/metadata").text
        meta = c.get("/metadata").json()
    assert "/home/alice" not in text and "/srv/cache" not in text
    assert meta["data"]["source"] == "…/normal.csv"
    assert meta["training"]["data_options"]["data_dir"] == "…/vae-anomaly"


def test_the_openapi_document_describes_the_served_model(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()["paths"]["/score"]["post"]
    instances = doc["requestBody"]["content"]["application/json"]["schema"]["properties"][
        "instances"
    ]
    forms = instances["oneOf"]  # flat vectors, or images nested (1, 8, 8) or (8, 8)
    assert [f["maxItems"] for f in forms] == [10_000] * 3
    flat = forms[0]["items"]
    assert flat["minItems"] == flat["maxItems"] == 64
    assert flat["items"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    fpr = next(p for p in doc["parameters"] if p["name"] == "target_fpr")["schema"]
    assert fpr["minimum"] > 0 and fpr["exclusiveMaximum"] == 1


def test_request_ids_and_logged_paths_are_bounded(
    trained: TrainOutcome, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's X-Request-Id is kept when it looks like one; a kilobyte of text, spaces or
    control characters get a new id instead (it is echoed and logged with every line). The
    access log keeps 256 characters of a long path and says how long it was."""
    from prometheus_client import CollectorRegistry

    from serving.app import create_app
    from serving.settings import Settings

    app = create_app(Settings(), detector=trained.detector, registry=CollectorRegistry())
    with TestClient(app) as c:
        _check_ids_and_paths(c, caplog)


def _check_ids_and_paths(c: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    ok = "3f2b9c1e-7a4d-4e2b-9f00-0c1d2e3f4a5b"
    assert c.get("/healthz", headers={"x-request-id": ok}).headers["x-request-id"] == ok
    for bad in ("x" * 129, "two words", "tab\there", ""):
        rid = c.get("/healthz", headers={"x-request-id": bad}).headers["x-request-id"]
        assert rid != bad and len(rid) == 16 and int(rid, 16) >= 0
    caplog.set_level("INFO", logger="vae_anomaly.access")
    assert c.get("/" + "p" * 20_000).status_code == 404
    line = json.loads(caplog.records[-1].getMessage())
    assert line["path"] == "/" + "p" * 255 + "... (20001 characters)"
