"""``patterns.admits``: whether a field's pattern can match a dot, decided from the parsed
regex. Pure: no I/O. The property tests hold the answer against the regex engine itself:
whenever ``re.fullmatch`` accepts a string holding a dot, ``admits`` must have said so."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from broker.patterns import admits

ADMITS_A_DOT = [
    r"^[a-z.]+$",
    r"\.",
    r".",
    r"(?s).",
    r"[^a]",
    r"[^\w]",
    r"\W",
    r"\D",
    r"\S",
    r"[,-/]",
    r"\x2e",
    r"\u002e",
    r"\N{FULL STOP}",
    r"[\x2e]",
    r"(?:a|b\.)",
    r"(a)(?(1)b|\.)",
    r"(?=(.))\1",
    r"(?P<x>[.a])(?P=x)",
    r"(?>a|\.)",
    r"[^\d\w]",
    r"a*+\.",
    r"a{0}\.",
    r"(?i)[^a-z0-9]",
]
NO_DOT = [
    r"^[a-z]+$",
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$",
    r"(?i)[A-Z0-9-]+",
    r"\w+",
    r"\d{1,3}",
    r"[\s]",
    r"(?:\.){0}a",  # repeated zero times: never matched
    r"(?=.)a",  # a lookahead consumes nothing
    r"(?!\.)[a-z]",
    r"[^\W]",
    r"[-a-z0-9_]{1,63}",
    r"^$",
    r"\bab\b",
]


@pytest.mark.parametrize("pattern", ADMITS_A_DOT)
def test_patterns_that_can_match_a_dot(pattern: str) -> None:
    assert admits(pattern, ".")


@pytest.mark.parametrize("pattern", NO_DOT)
def test_patterns_that_cannot_match_a_dot(pattern: str) -> None:
    assert not admits(pattern, ".")


def test_other_punctuation_and_bad_arguments() -> None:
    assert admits(r"^[a-z/]+$", "/")
    assert not admits(r"^[a-z.]+$", "/")
    with pytest.raises(ValueError):
        admits(r"a", "a")  # a letter has another case: not decided here
    with pytest.raises(ValueError):
        admits(r"a", "..")
    with pytest.raises(re.error):
        admits(r"[", ".")


ATOMS = st.sampled_from(
    [
        "a", "b", "-", r"\.", ".", "[a-z]", "[^a]", "[^.]", r"\w", r"\W", r"\d", r"\D",
        r"\s", r"\S", "[.-]", "[,-/]", "[a.]", r"\x2e", r"[\W\d]", r"[^\w]", "(?i:A)",
        r"[^\W]", r"\b", "$", "^",
    ]
)
QUANTIFIERS = st.sampled_from(["*", "+", "?", "{0}", "{2}", "{0,3}", "*?", "++", "{1,2}+"])


def _regex(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
        st.tuples(inner, QUANTIFIERS).map(lambda t: f"(?:{t[0]}){t[1]}"),
        inner.map(lambda r: f"(?={r})"),
        inner.map(lambda r: f"(?!{r})"),
        inner.map(lambda r: f"(?<!{r})"),
        inner.map(lambda r: f"(?>{r})"),
        # A group and a backreference to it (possibly captured inside a lookahead).
        st.tuples(inner, inner).map(lambda t: f"(?=(?P<g>{t[0]}))(?P=g){t[1]}"),
        st.tuples(inner, inner, inner).map(lambda t: f"(?P<g>{t[0]})?(?(g){t[1]}|{t[2]})"),
    )


REGEXES = st.recursive(ATOMS, _regex, max_leaves=6)
ALPHABET = "a.-/ 1"
SHORT_STRINGS = [
    "".join(chars) for n in range(5) for chars in itertools.product(ALPHABET, repeat=n)
]


def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error:
        assume(False)  # e.g. a name used twice, a lookbehind of variable width
        raise


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(REGEXES)
def test_every_short_string_with_a_dot_that_matches_was_admitted(pattern: str) -> None:
    """Exhaustive over every string of up to 4 characters from a small alphabet."""
    compiled = _compiled(pattern)
    if admits(pattern, "."):
        return
    for text in SHORT_STRINGS:
        assert not ("." in text and compiled.fullmatch(text)), (pattern, text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(REGEXES, st.data())
def test_strings_generated_from_a_pattern_without_a_dot_hold_none(
    pattern: str, data: st.DataObject
) -> None:
    _compiled(pattern)
    assume(not admits(pattern, "."))
    try:
        text = data.draw(st.from_regex(pattern, fullmatch=True))
    except Exception:  # hypothesis cannot generate for every construct (lookbehinds)
        assume(False)
        raise
    if re.fullmatch(pattern, text):
        assert "." not in text, (pattern, text)
