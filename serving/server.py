"""Run the service under uvicorn: ``vae-anomaly serve --model DIR``.

One worker runs the app in-process. Several workers each build the app from the environment
(``serving.app:create_app_from_env``), with prometheus_client's multiprocess mode so ``/metrics``
reports all of them. SIGTERM / Ctrl-C finish in-flight requests before exiting. SIGHUP reloads
the artifact in place (one worker), or restarts the workers on it one at a time (several): each
new worker is ready only once its model is loaded, and a bad artifact aborts the restart while
the old workers keep serving (``serving.app``'s lifespan, uvicorn >= 0.51).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from detector.errors import ConfigError
from serving.listen import TABLE_ENV, ConnectionTable
from serving.settings import ENV_PREFIX, Settings


def configure_logging(level: str) -> None:
    """The service's loggers (``vae_anomaly.*``: access log lines are JSON) to stderr.

    Configured on their own logger, so uvicorn's logging set-up leaves them alone.
    """
    logger = logging.getLogger("vae_anomaly")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def prepare_multiprocess_dir() -> None:
    """With PROMETHEUS_MULTIPROC_DIR set (the container image sets it), make sure the folder exists
    and holds no metric files of an earlier run, as prometheus_client requires."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    for stale in Path(folder).glob("*.db"):
        stale.unlink(missing_ok=True)


def run(settings: Settings) -> None:
    import uvicorn

    from serving.http import BoundedHttpToolsProtocol

    if not settings.model_dir:
        raise ConfigError("no model to serve: pass --model DIR or set VAE_ANOMALY_MODEL_DIR")
    from detector.artifact import load as verify_artifact

    verify_artifact(settings.model_dir)  # fail fast, before binding the port
    configure_logging(settings.log_level)
    BoundedHttpToolsProtocol.client_timeout_s = settings.client_timeout  # several: from the env
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,  # our JSON access log replaces uvicorn's
        "timeout_graceful_shutdown": 30,
        # httptools, with bounds on a request's head (431 past 64 KB) and on a client that stops
        # sending one (408 after --client-timeout)
        "http": "serving.http:BoundedHttpToolsProtocol",
    }
    prepare_multiprocess_dir()
    if settings.workers == 1:
        from serving.app import create_app

        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
        return
    # Several workers: each rebuilds the settings from the environment.
    for key, value in asdict(settings).items():
        os.environ[ENV_PREFIX + key.upper()] = str(value)
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="vae-anomaly-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    # the workers' open connections, counted where each can see the others' (serving.listen)
    table_dir = tempfile.mkdtemp(prefix="vae-anomaly-conns-")
    table = os.path.join(table_dir, "connections")
    ConnectionTable.create(table)
    os.environ[TABLE_ENV] = table
    try:
        uvicorn.run(
            "serving.app:create_app_from_env",
            factory=True,
            workers=settings.workers,
            # a new worker imports torch and loads the model before it is ready: give it time
            # before a rolling restart gives up on it (and keeps the old worker)
            timeout_worker_healthcheck=60,
            # the workers share one socket: each takes a waiting connection only while it holds
            # no more connections than the others (serving.listen)
            loop="serving.listen:new_event_loop",
            **common,  # type: ignore[arg-type]
        )
    finally:
        shutil.rmtree(table_dir, ignore_errors=True)
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
