"""What a field's ``pattern`` can match, decided from the parsed regular expression.

    admits(pattern, ".") -> bool

True unless no string the pattern fully matches can contain the character. The answer is
sound, not exact: it walks the tree Python's own regex parser builds (``re._parser``), and
every construct that could consume the character — a literal, ``.``, a set or category
holding it, a negated set or literal, a backreference to a group that could hold it, any
construct this walk does not know — counts as admitting it. A pattern it calls safe is
safe; a pattern that can never really match the character may still be called unsafe
(``(?!x)\\.`` is). Probing a few strings instead would miss what they do not try.

Used at load time to refuse a host label whose pattern admits a dot (a value
``evil.example`` would then choose the host, see ``urltemplates``).
"""

from __future__ import annotations

import re
import string
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typeshed describes the parser under its old, deprecated name
    import sre_constants as _c
    import sre_parse as _p
else:
    import re._constants as _c
    import re._parser as _p

__all__ = ["admits"]

_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT)


@cache
def admits(pattern: str, char: str) -> bool:
    """Whether some string that ``re.fullmatch(pattern, ...)`` accepts can contain ``char``.

    ``char`` is one ASCII punctuation character: those have no other case, so flags such
    as ``(?i)`` cannot change the answer. Raises ``re.error`` for an invalid pattern.
    """
    if len(char) != 1 or char not in string.punctuation:
        raise ValueError("admits() decides for one ASCII punctuation character")
    tree = _p.parse(pattern)
    groups: dict[int, Any] = {}
    _collect_groups(tree, groups)
    return _Walk(ord(char), groups).sequence(tree)


def _collect_groups(items: Any, groups: dict[int, Any]) -> None:
    """Every capturing group's subpattern, wherever it is (a lookahead too: a
    backreference consumes what a group inside a lookahead captured)."""
    for op, av in items:
        if op is _c.SUBPATTERN:
            group, _add, _del, sub = av
            if group is not None:
                groups[group] = sub
            _collect_groups(sub, groups)
        elif op is _c.BRANCH:
            for alternative in av[1]:
                _collect_groups(alternative, groups)
        elif op in _REPEATS:
            _collect_groups(av[2], groups)
        elif op is _c.ATOMIC_GROUP:
            _collect_groups(av, groups)
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            _collect_groups(av[1], groups)
        elif op is _c.GROUPREF_EXISTS:
            _cond, yes, no = av
            _collect_groups(yes, groups)
            if no is not None:
                _collect_groups(no, groups)


class _Walk:
    def __init__(self, code: int, groups: dict[int, Any]) -> None:
        self.code = code
        self.groups = groups
        self.following: set[int] = set()  # groups being followed (a reference inside itself)

    def sequence(self, items: Any) -> bool:
        return any(self.item(op, av) for op, av in items)

    def item(self, op: Any, av: Any) -> bool:
        if op is _c.LITERAL:
            return bool(av == self.code)
        if op is _c.NOT_LITERAL:
            return bool(av != self.code)
        if op is _c.ANY:
            return True  # '.' matches everything but a newline, and the character is not one
        if op is _c.IN:
            return self.in_set(av)
        if op in _REPEATS:
            _low, high, sub = av
            return bool(high != 0) and self.sequence(sub)
        if op is _c.SUBPATTERN:
            return self.sequence(av[3])
        if op is _c.ATOMIC_GROUP:
            return self.sequence(av)
        if op is _c.BRANCH:
            return any(self.sequence(alternative) for alternative in av[1])
        if op is _c.GROUPREF_EXISTS:
            _cond, yes, no = av
            return self.sequence(yes) or (no is not None and self.sequence(no))
        if op is _c.GROUPREF:
            if av in self.following:
                return False  # already being decided higher up
            self.following.add(av)
            try:
                return av not in self.groups or self.sequence(self.groups[av])
            finally:
                self.following.discard(av)
        # Anchors and lookarounds consume nothing: the matched text is made only of what
        # the other items consume (groups captured in a lookaround are followed through
        # the backreferences that consume them). Any construct this walk does not know
        # is assumed to admit the character.
        return op not in (_c.AT, _c.ASSERT, _c.ASSERT_NOT)

    def in_set(self, items: Any) -> bool:
        negated = False
        hit = False
        for op, av in items:
            if op is _c.NEGATE:
                negated = True
            elif op is _c.LITERAL:
                hit = hit or av == self.code
            elif op is _c.RANGE:
                low, high = av
                hit = hit or low <= self.code <= high
            elif op is _c.CATEGORY:
                hit = hit or _category_holds(av, chr(self.code))
            else:
                return True  # unknown set item: assume the worst
        return hit != negated


def _category_holds(category: Any, char: str) -> bool:
    """Whether a category (``\\d``, ``\\W``, ...) holds ``char``, asked of the regex engine
    itself through the escape that names the category."""
    escapes: dict[str, tuple[Any, Any]] = dict(_p.CATEGORIES)
    for escape, (op, av) in escapes.items():
        if op is _c.IN and len(av) == 1 and av[0] == (_c.CATEGORY, category):
            return re.fullmatch(escape, char) is not None
    return True  # a category with no escape: assume it holds the character
