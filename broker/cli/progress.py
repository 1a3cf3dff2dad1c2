"""Progress of long work (``keys rotate``, ``providers import``): a bar on a terminal, plain
lines otherwise (a log file, a CI job), both on stderr so stdout stays the result."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import IO, Any, TextIO, cast

import click

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, "re-encrypting") as progress: progress.to(done)``.

    On a terminal, click's progress bar; otherwise a plain line (``re-encrypting: 500 of
    1200``) about every tenth of the work and at the end. ``total`` may be 0 (no bar)."""

    def __init__(self, total: int, label: str, *, stream: IO[str] | None = None) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._said = 0
        self._bar: Any = None

    @property
    def terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def __enter__(self) -> Progress:
        if self.terminal and self.total:
            self._bar = click.progressbar(
                length=self.total, label=self.label, file=cast(TextIO, self.stream), show_pos=True
            ).__enter__()
        return self

    def to(self, done: int) -> None:
        """``done`` of ``total`` are finished (a count that only grows)."""
        step, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.update(max(step, 0))
        elif done >= self.total or done - self._said >= max(1, self.total // 10):
            # Plain lines: about one per tenth of the work, and the last.
            self._said = done
            click.echo(f"{self.label}: {done} of {self.total}", file=self.stream)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, exc, tb)
