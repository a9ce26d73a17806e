"""``vae-anomaly serve`` as a child process on a free loopback port.

Used by the load benchmark, the integration tests and the dashboard preview: start, wait until
``/readyz`` answers 200, stop with SIGTERM (graceful), read the server's log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterator
from pathlib import Path
from types import TracebackType

from detector.errors import ConfigError, VAEAnomalyError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_cpus(cpus: Collection[int], what: str) -> frozenset[int]:
    """``cpus`` as a set, if this process may run on all of them (Linux); a clear error if not."""
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError(f"{what}: setting CPU affinity needs Linux")
    allowed = os.sched_getaffinity(0)
    chosen = frozenset(cpus)
    if not chosen:
        raise ConfigError(f"{what}: no CPUs given")
    outside = sorted(chosen - allowed)
    if outside:
        raise ConfigError(
            f"{what}: CPU {outside[0]} is not one this process may use "
            f"({','.join(map(str, sorted(allowed)))})"
        )
    return chosen


@contextlib.contextmanager
def cpu_affinity(cpus: Collection[int] | None) -> Iterator[None]:
    """The block runs on ``cpus`` only (None: unchanged), then the calling thread's CPUs are
    restored; processes started inside keep the set, and so do their children (Linux)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class ServerProcess:
    """``vae-anomaly serve --model DIR --port PORT [args]``; a context manager that waits ready."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *args: str,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        cpus: Collection[int] | None = None,
    ) -> None:
        """``command``: another server to run instead (``{port}`` in it becomes the port);
        ``cpus``: the only CPUs the server and its workers may run on (None: any)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if command is not None:
            cmd = [c.replace("{port}", str(self.port)) for c in command]
        else:
            cmd = [sys.executable, "-m", "vae_anomaly", "serve", "--model", str(model_dir)]
            cmd += ["--port", str(self.port), *args]
        fd, log = tempfile.mkstemp(prefix=f"vae-anomaly-serve-{self.port}-", suffix=".log")
        self.log_path = Path(log)
        self._log = os.fdopen(fd, "w")
        with cpu_affinity(cpus):  # inherited at the fork, before the server runs anything
            self.proc = subprocess.Popen(
                cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VAEAnomalyError(
                    f"the server exited with {self.proc.returncode}: {self.log().strip()[-500:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise VAEAnomalyError(f"the server was not ready after {timeout}s: {self.log()[-500:]}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (in-flight requests finish), then wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
