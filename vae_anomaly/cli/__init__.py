"""The ``vae-anomaly`` command line: one module per command family, each holding its options
next to its handler (``data``, ``train``, ``evaluate`` + ``report``, ``score``, ``serve`` +
``info``, and the measuring commands in ``bench``).

Errors print one line on stderr and exit non-zero (1: the run failed, 2: bad usage); nothing
half-written is left behind.

Thread policy is set here, for every command, before torch loads: OpenMP threads that spin
while idle slow training 5-20x on a busy or CPU-limited machine, so ``OMP_WAIT_POLICY`` defaults
to PASSIVE, and ``OMP_NUM_THREADS`` to the CPUs this process may use (the cgroup quota and
affinity mask, not the machine's core count). Variables you set yourself are kept.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from vae_anomaly.cli._common import EXIT_FAILURE, PROG, HelpFormatter, Parser, one_line, version

__all__ = ["build_parser", "main"]


def build_parser() -> Parser:
    from vae_anomaly.cli import bench, data, evaluate, score, serve, train

    p = Parser(
        prog=PROG,
        description="Anomaly detection with a Variational Autoencoder: train on normal data, "
        "calibrate a threshold on the negative ELBO (higher = more anomalous), score new samples.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for family in (data, train, evaluate, score, serve, bench):  # the order of --help
        family.register(sub, HelpFormatter)
    return p


def set_thread_policy() -> bool:
    """Default OMP_WAIT_POLICY and OMP_NUM_THREADS for this process and its children.

    Returns True when the wait policy was set only now, after torch had already loaded OpenMP
    (which reads it once): then it has no effect in this process.
    """
    from serving.cpus import cpu_quota  # standard library only: no torch yet

    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_quota()))
    if "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "torch" in sys.modules


def main(argv: Sequence[str] | None = None) -> int:
    too_late = set_thread_policy()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and too_late:
        _reexec(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from detector.errors import VAEAnomalyError

    try:
        return int(args.handler(args))
    except VAEAnomalyError as e:
        sys.stderr.write(f"{PROG}: error: {one_line(e)}\n")
        return EXIT_FAILURE
    except OSError as e:  # a file we could not read or write: name it, no traceback
        if e.strerror and e.filename:  # raised by the OS: "Permission denied: /path"
            sys.stderr.write(f"{PROG}: error: {one_line(e.strerror)}: {e.filename}\n")
        else:  # raised by us with a message
            sys.stderr.write(f"{PROG}: error: {one_line(e)}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


def _reexec(argv: list[str]) -> NoReturn:
    """Run ``serve`` again in a fresh interpreter, whose OpenMP reads the passive policy.

    OpenMP threads busy-wait after each parallel region by default; in a server that runs a small
    forward pass per request they spin on the cores the event loop needs (measured: 600-790 vs
    910-1,270 single-instance requests/s at 8 clients on 2 cores). This only happens when
    ``main`` is called from a process that had loaded torch before (the console script has not).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "vae_anomaly", *argv])
