"""dbguard.databases.retry: how many tries, which errors end it, the waits between tries;
the expected counts and waits are written out by hand."""
from __future__ import annotations

import pytest

from dbguard.databases.retry import exponential, retry


class Transient(Exception):
    pass


def _failing(n_failures: int, error: type[Exception] = Transient):
    tries = []

    def call():
        tries.append(1)
        if len(tries) <= n_failures:
            raise error(f"try {len(tries)}")
        return "connected"
    return call, tries


# (failures before success, attempts allowed, error) -> (outcome, tries made)
CASES = [((0, 3, Transient), ("connected", 1)), ((1, 3, Transient), ("connected", 2)),
         ((2, 3, Transient), ("connected", 3)), ((3, 3, Transient), ("try 3", 3)),
         ((5, 2, Transient), ("try 2", 2)), ((1, 3, KeyError), ("'try 1'", 1))]


@pytest.mark.parametrize("case,expected", CASES)
def test_tries_and_outcome(case, expected):
    n_failures, attempts, error = case
    call, tries = _failing(n_failures, error)
    try:
        got = retry(call, lambda e: isinstance(e, Transient), attempts=attempts, within=60, wait=lambda n: 0)
    except Exception as e:
        got = str(e)
    assert (got, len(tries)) == expected


def test_the_last_error_is_raised_as_it_was():
    call, _ = _failing(9)
    with pytest.raises(Transient, match="try 2"):
        retry(call, lambda e: True, attempts=2, within=60, wait=lambda n: 0)


def test_no_second_try_once_the_time_is_up():
    call, tries = _failing(9)
    with pytest.raises(Transient):
        retry(call, lambda e: True, attempts=5, within=0, wait=lambda n: 0)
    assert len(tries) == 1


def test_exponential_waits_double_up_to_the_most():
    class State:                      # what a wait is given: the number of the try that failed
        def __init__(self, n):
            self.attempt_number = n
    waits = [exponential(0.05, 0.5)(State(n)) for n in range(1, 8)]
    assert waits == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5])
