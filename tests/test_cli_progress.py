"""broker/cli/progress.py: a bar on a terminal, plain lines otherwise. In-memory streams."""

from __future__ import annotations

import io

from broker.cli.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_about_every_tenth_and_the_last() -> None:
    stream = io.StringIO()
    with Progress(100, "converting", stream=stream) as progress:
        for done in range(1, 101):
            progress.to(done)
    lines = stream.getvalue().splitlines()
    assert lines == [f"converting: {n} of 100" for n in range(10, 101, 10)]


def test_a_bar_on_a_terminal() -> None:
    stream = Terminal()
    with Progress(4, "re-encrypting", stream=stream) as progress:
        progress.to(2)
        progress.to(4)
    out = stream.getvalue()
    assert "re-encrypting" in out and "4/4" in out and "of 4" not in out


def test_nothing_to_do_prints_nothing_on_a_terminal() -> None:
    stream = Terminal()
    with Progress(0, "re-encrypting", stream=stream):
        pass
    assert stream.getvalue() == ""
