"""The real service on a loopback port, for integration tests (see serving.process)."""

from __future__ import annotations

from serving.process import ServerProcess, free_port

LiveServer = ServerProcess

__all__ = ["LiveServer", "free_port"]
