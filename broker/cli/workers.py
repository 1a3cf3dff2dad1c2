"""``broker serve --workers N``: N processes serving one port.

The parent applies the migrations, creates what the first start creates (the SQLite key
and token files), binds the listening socket, and forks N workers. Each worker opens its
own ``Broker`` (its own pool, credential cache and refresh sweep) and serves the shared
socket; the kernel hands each new connection to one of them. Nothing passes between the
workers: their caches stay coherent through the events feed (a change made in one is
seen by the others within ``cache.MAX_STALENESS``), and their sweeps share the work
through the refresh leases, as separate replicas do.

On SIGTERM (or SIGINT) the parent passes the signal to every worker, each drains as a
single ``broker serve`` does (requests in flight answered, refreshes in flight stored),
and the parent exits 0 once all have. A worker that dies otherwise is started again after
a second; one that keeps dying (``MAX_RESTARTS`` in ``RESTART_WINDOW`` seconds) stops the
whole server with status 1.

How to pick N: one per core the broker may use. Beyond the cores there is nothing to gain
(each worker is one Python thread of work), and each worker holds its own database pool
(PostgreSQL: ``N x`` the pool size) and sweeps on its own schedule.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW", "bind", "restart_allowed", "supervise"]

log = logging.getLogger("broker")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


def restart_allowed(deaths: deque[float], now: float) -> bool:
    """Whether a worker that just died may be started again: fewer than ``MAX_RESTARTS``
    deaths within the last ``RESTART_WINDOW`` seconds (``deaths`` holds their times)."""
    while deaths and now - deaths[0] > RESTART_WINDOW:
        deaths.popleft()
    return len(deaths) < MAX_RESTARTS


def bind(host: str, port: int, *, backlog: int = 2048) -> socket.socket:
    """The listening socket every worker accepts on (inherited across ``fork``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def supervise(workers: int, work: Callable[[int], int]) -> int:
    """Fork ``workers`` processes running ``work(index)`` (its return value is the child's
    exit status) and look after them until a signal says stop; the exit status."""
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False
    deaths: deque[float] = deque()

    def start(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: its own signal handlers come with its server
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = work(index)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    for index in range(workers):
        start(index)
    log.info("%d workers started", workers)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries os.wait
            continue
        if pid not in children:
            continue
        index = children.pop(pid)
        if stopping:
            continue
        log.error("worker %d (pid %d) exited (status %d)", index, pid,
                  os.waitstatus_to_exitcode(code))
        deaths.append(time.monotonic())
        if restart_allowed(deaths, time.monotonic()):
            time.sleep(1.0)
            if not stopping:
                start(index)
        else:
            log.error("workers keep exiting (%d in %g s): stopping", MAX_RESTARTS,
                      RESTART_WINDOW)
            status = 1
            stop(signal.SIGTERM, None)
    return status
