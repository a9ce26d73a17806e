"""deploy/: Prometheus config and alert rules (promtool), the dashboard and rules name only metrics
the service exports, compose and Kubernetes files pass their schemas, the Dockerfile's promises.

No Docker engine runs here: the image is checked statically, not built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serving.live import LiveServer
from training.pipeline import TrainOutcome

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("VAE_ANOMALY_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return tool


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus/prometheus.yml"],
        ["check", "rules", "prometheus/alerts.yml"],
        ["test", "rules", "prometheus/alerts_test.yml"],
    ],
)
def test_promtool(args: list[str]) -> None:
    r = subprocess.run(
        [_promtool(), *args], cwd=DEPLOY, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    quiet = {
        t["alertname"] for case in tests for t in case["alert_rule_test"] if not t["exp_alerts"]
    }
    assert alerts == fired == quiet


def _queried_metrics() -> set[str]:
    exprs: list[str] = []
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "vae-anomaly.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {m for e in exprs for m in re.findall(r"\bvae_anomaly_[a-z_]+\b", e)}


@pytest.mark.slow
def test_dashboard_and_rules_use_only_exported_metrics(trained: TrainOutcome) -> None:
    assert trained.path is not None
    # two workers: the per-worker connection gauge exists only then
    with LiveServer(trained.path, "--workers", "2") as srv:
        assert httpx.post(srv.url + "/score", json={"instances": [[0.1] * 64]}).status_code == 200
        assert httpx.post(srv.url + "/score", json={"instances": [[0.1] * 3]}).status_code == 422
        text = httpx.get(srv.url + "/metrics").text
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    queried = _queried_metrics()
    assert len(queried) >= 10
    missing = sorted(queried - exported)
    assert missing == [], f"dashboard / rules query metrics the service does not export: {missing}"


def test_compose_file_matches_the_compose_schema() -> None:
    r = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"vae-anomaly", "prometheus", "grafana"}
    for svc in compose["services"].values():  # every mounted file of ours exists
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), src
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["vae-anomaly:8000"]


def test_kubernetes_manifests_are_valid() -> None:
    kustom = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = [str(DEPLOY / "k8s" / f) for f in kustom["resources"]]
    r = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", *files],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    dep = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["limits"]["cpu"] and any(
        m["mountPath"] == "/models/model" for m in c["volumeMounts"]
    )
    sm = yaml.safe_load((DEPLOY / "k8s" / "servicemonitor.yaml").read_text())
    assert sm["kind"] == "ServiceMonitor" and sm["spec"]["endpoints"][0]["path"] == "/metrics"


def test_kserve_inference_service_matches_the_service() -> None:
    """The KServe manifest (a CRD: no schema offline, so checked by what it must agree with): a
    custom predictor on our image, its probes on the v2 health routes the service answers, every
    VAE_ANOMALY_* variable a real setting, the port it listens on the one it declares, the model
    where the storage initializer puts it, and the PVC the one pvc.yaml defines."""
    from dataclasses import fields

    from serving.app import create_app
    from serving.settings import ENV_PREFIX, Settings

    isvc = yaml.safe_load((DEPLOY / "k8s" / "kserve-inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    (c,) = isvc["spec"]["predictor"]["containers"]
    assert c["name"] == "kserve-container"  # the name KServe's storage initializer looks for
    dep = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    assert c["image"] == dep["spec"]["template"]["spec"]["containers"][0]["image"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    settings = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    ours = {k for k in env if k.startswith(ENV_PREFIX)}
    assert ours <= settings, ours - settings
    st = Settings.from_env({k: v for k, v in env.items() if k in ours and v is not None})
    assert [p["containerPort"] for p in c["ports"]] == [st.port]
    assert st.model_dir == "/mnt/models" and st.host == "0.0.0.0"
    pvc = yaml.safe_load((DEPLOY / "k8s" / "pvc.yaml").read_text())
    assert env["STORAGE_URI"] == f"pvc://{pvc['metadata']['name']}"
    routes = {getattr(r, "path", None) for r in create_app(Settings()).routes}
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == st.port
        assert c[probe]["httpGet"]["path"] in routes, probe


def test_dockerfile_promises() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.M)) >= 2  # multi-stage
    assert re.search(r"^USER app$", text, flags=re.M)  # not root
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert (
        "PROMETHEUS_MULTIPROC_DIR" in text and "ARG BASE_IMAGE" in text and "ARG MODEL_SRC" in text
    )
    # Every package the project installs is in the image (the entry point lives in vae_anomaly).
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    for pattern in packages:
        name = pattern.rstrip("*")
        assert f"COPY {name} ./{name}" in text, f"the image lacks the {name} package"
    # The install step is the README's set-up (CPU torch pin), non-editable.
    assert "pip install -r requirements/cpu.txt ." in text
    readme = (ROOT / "README.md").read_text()
    assert "pip install -r requirements/cpu.txt -e ." in readme
    for src in re.findall(r"^COPY (?!--from)(?:--chown=\S+ )?(\S+) ", text, flags=re.M):
        if not src.startswith("$"):
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
    assert (DEPLOY / "model").is_dir() and (ROOT / ".dockerignore").is_file()
