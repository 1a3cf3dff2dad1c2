"""Fault injection: the next N matching requests misbehave in a chosen way."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Fault:
    kind: str  # "error" | "delay" | "timeout"
    remaining: int
    endpoint: str = "token"  # "token" | "revoke" | "api" | "*"
    grant_type: str | None = None  # only for the token endpoint; None = any
    status: int = 500
    retry_after: float | None = None
    seconds: float = 0.0
    process: bool = False  # timeout: handle the request first, then stall the response
    body: str | None = None

    def matches(self, endpoint: str, grant_type: str | None) -> bool:
        if self.endpoint not in ("*", endpoint):
            return False
        return self.grant_type is None or self.grant_type == grant_type


class Faults:
    """A thread-safe FIFO of faults; each request consumes one use of the first match."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        if fault.remaining < 1:
            raise ValueError("a fault needs n >= 1")
        with self._lock:
            self._queue.append(fault)
        return fault

    def take(self, endpoint: str, grant_type: str | None) -> Fault | None:
        with self._lock:
            for fault in self._queue:
                if fault.matches(endpoint, grant_type):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._queue.remove(fault)
                    return fault
        return None

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(f.remaining for f in self._queue)
