"""One escaping helper for every human-readable output: log lines, explain, check, errors."""
from __future__ import annotations

import io
import logging

import pytest

from dbguard.escape import LogEscape, has_control, printable, shown


@pytest.mark.parametrize("raw, safe", [
    ("postgres: checkpointer", "postgres: checkpointer"),
    ("a\nb", "a\\x0ab"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("tab\there", "tab\\x09here"),
    ("del\x7f c1\x9b", "del\\x7f c1\\x9b"),
    ("bidi\u202eTXT.exe", "bidi\\u202eTXT.exe"),
    ("line\u2028sep", "line\\u2028sep"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("é ü 中文 🙂", "é ü 中文 🙂"),       # printable text stays as it is
    ("C:\\path", "C:\\path"),
])
def test_printable(raw, safe):
    assert printable(raw) == safe
    assert "\n" not in printable(raw) and "\x1b" not in printable(raw)
    assert has_control(raw) == (raw != safe)


def test_has_control_allows_what_it_is_told():
    assert has_control("host=a\nport=5") and not has_control("host=a\nport=5", "\t\n\r")


def test_shown_is_short_and_bounded_in_depth():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert shown(deep) == "[[[[...]]]]"
    assert len(shown("x" * 10_000)) < 80
    assert shown("a\x1bb") == "'a\\x1bb'"


def test_log_lines_are_escaped_once_formatted():
    logger = logging.getLogger("dbguard.test-escape")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.addFilter(LogEscape())
    logger.propagate = False
    try:
        logger.warning("killed %s (%d)", "evil\nINFO forged line\x1b[2J", 42)
        logger.warning("plain")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "WARNING killed evil\\x0aINFO forged line\\x1b[2J (42)\nWARNING plain\n"
