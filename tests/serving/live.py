"""The real service on a loopback port, for integration tests (see vae_anomaly.bench.process)."""

from __future__ import annotations

from vae_anomaly.bench.process import ServerProcess, free_port

LiveServer = ServerProcess

__all__ = ["LiveServer", "free_port"]
