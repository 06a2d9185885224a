"""Text from the host made safe for a terminal or a log line: one helper for every human output.

Process names, command lines, queries, key names and paths are chosen by whoever runs them:
a newline would forge a log line, an escape sequence would rewrite the operator's terminal.
JSON output (the audit log, --json) escapes by itself and keeps the raw text.
"""
from __future__ import annotations

import reprlib
from typing import Any

# Format characters that reorder or hide text (bidi overrides and isolates, zero widths), the
# line and paragraph separators; surrogates (0xD800-0xDFFF) are checked by range. Listed, not
# looked up in unicodedata: this module is imported by lab.hog, whose RSS tests weigh.
_HIDING = {0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x2028, 0x2029, 0x2060, 0xFEFF,
           *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _unsafe(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o < 0xA0 or o in _HIDING or 0xD800 <= o <= 0xDFFF


def has_control(text: str, allowed: str = "") -> bool:
    """True when `text` holds a character printable() would escape (other than `allowed`)."""
    return not text.isprintable() and any(_unsafe(ch) and ch not in allowed for ch in text)


def printable(text: Any) -> str:
    """`text` with every control character, escape sequence opener, line separator and
    bidi/zero-width format character written as \\xNN / \\uNNNN. One line, always."""
    s = str(text)
    if s.isprintable():
        return s            # the common case, a single C-level scan
    out = []
    for ch in s:
        if _unsafe(ch):
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def say(line: str) -> None:
    """Print one line of human output (explain, check) with what came from the host escaped."""
    print(printable(line))


_short = reprlib.Repr()
_short.maxlevel = 3
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = 6


def shown(value: Any) -> str:
    """A config value as an error message quotes it: short, bounded in depth (a value nested
    thousands deep is not walked), one printable line."""
    try:
        return printable(_short.repr(value))
    except ValueError:          # an int past Python's 4300-digit conversion limit
        return "(a number too long to show)"


class LogEscape:
    """A logging filter: escapes every dbguard log message once formatted with its arguments.

    Installed on the "dbguard" logger: whatever a message interpolates (a process name, a
    database error quoting a query) cannot split the line or reach the terminal raw.
    Tracebacks (exc_info) are added by the formatter after this and stay multi-line."""

    def filter(self, record) -> bool:
        record.msg, record.args = printable(record.getMessage()), None
        return True


def install(logger_name: str = "dbguard") -> None:
    import logging
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, LogEscape) for f in logger.filters):
        logger.addFilter(LogEscape())
