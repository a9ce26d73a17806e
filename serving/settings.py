"""Service settings, from keyword arguments or ``VAE_ANOMALY_*`` environment variables.

Bad values fail fast at start-up with a message naming the variable (cf. the FastAPI full-stack
template's ``core/config.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from detector.errors import ConfigError
from serving.cpus import cpu_quota

ENV_PREFIX = "VAE_ANOMALY_"
RUNTIMES = ("auto", "torch", "onnxruntime")  # detector.detector.RUNTIMES, without loading torch


@dataclass(frozen=True)
class Settings:
    model_dir: str = ""  # artifact directory to serve (VAE_ANOMALY_MODEL_DIR)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_batch_size: int = 64  # rows gathered into one forward pass
    max_wait_ms: float = 0.0  # extra wait for company; 0 = greedy (batch what queued meanwhile)
    max_instances: int = 10_000  # instances per request (413 above)
    max_body_bytes: int = 64 * 1024 * 1024  # request body limit (413 above)
    # how long to wait for a request's line and headers (from the connection or the request's
    # first bytes) and for the next part of a body that stopped coming (408 after it;
    # serving.http)
    client_timeout: float = 60.0  # seconds
    torch_threads: int = 0  # 0: the CPU quota divided among the workers
    api_key: str = ""  # if set, /score, /metadata and /admin need header X-API-Key
    enable_admin: bool = False  # POST /admin/reload (needs api_key)
    # POST /admin/reload loads only artifacts inside this folder; "" = the folder that holds
    # model_dir
    model_root: str = ""
    device: str = "cpu"
    # what runs the network: auto (ONNX Runtime on the CPU, torch on a GPU), torch or onnxruntime
    runtime: str = "auto"
    log_level: str = "info"
    access_log: bool = True
    model_name: str = "vae-anomaly"  # the model's name in the Open Inference Protocol's routes
    drift_alpha: float = 0.01  # false-alarm bound of the drift test (detector.drift)
    drift_window: int = 1000  # the last scores the drift KS statistic compares

    def __post_init__(self) -> None:
        checks = [
            (self.port, 0 <= self.port <= 65535, "port must be 0-65535"),
            (self.workers, self.workers >= 1, "workers must be >= 1"),
            (self.max_batch_size, self.max_batch_size >= 1, "max_batch_size must be >= 1"),
            (self.max_wait_ms, 0 <= self.max_wait_ms <= 1000, "max_wait_ms must be 0-1000"),
            (self.max_instances, self.max_instances >= 1, "max_instances must be >= 1"),
            (self.max_body_bytes, self.max_body_bytes >= 1024, "max_body_bytes must be >= 1024"),
            (
                self.client_timeout,
                0.1 <= self.client_timeout <= 3600,
                "client_timeout must be 0.1-3600",
            ),
            (self.torch_threads, self.torch_threads >= 0, "torch_threads must be >= 0"),
            (self.drift_alpha, 0 < self.drift_alpha < 1, "drift_alpha must be in (0, 1)"),
            (self.drift_window, self.drift_window >= 10, "drift_window must be >= 10"),
        ]
        for value, ok, msg in checks:
            if not ok:
                raise ConfigError(f"{msg}, got {value}")
        if self.enable_admin and self.workers > 1:
            raise ConfigError(
                "enable_admin needs workers = 1: with several workers each holds its own model, "
                "and POST /admin/reload would reload only the one that answers it; reload "
                "several workers with SIGHUP (a rolling restart) instead"
            )
        if self.enable_admin and not self.api_key:
            raise ConfigError(
                "enable_admin needs an API key: set VAE_ANOMALY_API_KEY, so that not everyone "
                "who can reach the port can swap the model"
            )
        if not self.model_name or not all(c.isalnum() or c in "-_." for c in self.model_name):
            raise ConfigError(
                f"model_name must be letters, digits, '-', '_' or '.', got {self.model_name!r}"
            )
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(
                f"log_level must be one of critical, error, warning, info, debug, got {self.log_level!r}"
            )

    @property
    def reload_root(self) -> Path | None:
        """The folder POST /admin/reload may load from, or None when none is configured."""
        if self.model_root:
            return Path(self.model_root).resolve()
        if self.model_dir:
            return Path(self.model_dir).resolve().parent
        return None

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, cpu_quota() // self.workers)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``VAE_ANOMALY_<FIELD>`` variables; ``overrides`` (not None) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, type(getattr(cls(), f.name)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(name: str, raw: str, typ: type) -> Any:
    var = ENV_PREFIX + name.upper()
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a valid {typ.__name__}") from None
