"""dbguard.serve's status lines: its own phrase table against the standard library's."""
from __future__ import annotations

import re
from http import HTTPStatus
from pathlib import Path

from dbguard.serve import PHRASES, _response

DBGUARD = Path(__file__).resolve().parents[2] / "dbguard"


def test_each_phrase_is_the_standard_one():
    assert PHRASES and all(HTTPStatus(code).phrase == phrase for code, phrase in PHRASES.items())


def test_every_status_the_server_and_the_metrics_handler_answer_has_its_phrase():
    # Statuses as the code writes them: _response(NNN, ...), "status = NNN", "return NNN, ...".
    pattern = re.compile(r"(?:_response\(|status, ctype, body = |return |else )([1-5]\d\d)\b")
    used = {int(code) for name in ("serve.py", "metrics.py")
            for code in pattern.findall((DBGUARD / name).read_text())}
    assert {200, 404, 405, 503} <= used, used          # the scan itself still finds them
    assert used <= PHRASES.keys(), used - PHRASES.keys()


def test_status_line():
    assert _response(405, "text/plain", b"x").startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert _response(503, "application/json", b"{}", head_only=True).endswith(b"\r\n\r\n")
