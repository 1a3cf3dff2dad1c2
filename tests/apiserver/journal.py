"""What the API server saw: one record per request, and the per-key ``/flaky`` counters.

The server thread writes while the test thread reads, so everything goes through one lock.
Records are appended when a request arrives; ``principal`` and ``status`` are filled in as
the request is authenticated and answered (``status`` stays None when no answer was sent,
e.g. the client went away during ``/slow``).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass


@dataclass
class RequestRecord:
    method: str
    path: str  # decoded path, prefix included: "/bearer/echo"
    query: str  # raw query string as received, "" when none
    headers: dict[str, str]  # lowercased names; repeated headers joined with ", "
    principal: str | None = None  # None: not authenticated (open prefix, or rejected)
    status: int | None = None  # the status answered; None while unanswered


class Journal:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._attempts: Counter[str] = Counter()

    def open(self, record: RequestRecord) -> RequestRecord:
        with self.lock:
            self._records.append(record)
        return record

    def set_principal(self, record: RequestRecord, principal: str | None) -> None:
        with self.lock:
            record.principal = principal

    def set_status(self, record: RequestRecord, status: int) -> None:
        with self.lock:
            record.status = status

    def attempt(self, key: str) -> int:
        """Count one more ``/flaky/{key}`` request; return its number (1 for the first)."""
        with self.lock:
            self._attempts[key] += 1
            return self._attempts[key]

    def attempts(self, key: str) -> int:
        with self.lock:
            return self._attempts[key]

    def records(self) -> list[RequestRecord]:
        with self.lock:
            return list(self._records)

    def clear(self) -> None:
        with self.lock:
            self._records.clear()
            self._attempts.clear()
