"""dbguard.databases.retry: how many tries, which errors end it, the waits between tries
(tenacity's stop/wait, which the connections used before, as the oracle)."""
from __future__ import annotations

import pytest
import tenacity

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


def _tenacity_tries(n_failures: int, attempts: int, error: type[Exception] = Transient) -> tuple[object, int]:
    call, tries = _failing(n_failures, error)
    r = tenacity.Retrying(retry=tenacity.retry_if_exception(lambda e: isinstance(e, Transient)),
                          stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_after_delay(60),
                          wait=tenacity.wait_none(), reraise=True)
    try:
        return r(call), len(tries)
    except Exception as e:
        return str(e), len(tries)


@pytest.mark.parametrize("n_failures,attempts,error", [(0, 3, Transient), (1, 3, Transient), (2, 3, Transient),
                                                       (3, 3, Transient), (5, 2, Transient), (1, 3, KeyError)])
def test_tries_and_outcome_as_tenacity(n_failures, attempts, error):
    call, tries = _failing(n_failures, error)
    try:
        got = retry(call, lambda e: isinstance(e, Transient), attempts=attempts, within=60, wait=lambda n: 0)
    except Exception as e:
        got = str(e)
    assert (got, len(tries)) == _tenacity_tries(n_failures, attempts, error)


def test_the_last_error_is_raised_as_it_was():
    call, _ = _failing(9)
    with pytest.raises(Transient, match="try 2"):
        retry(call, lambda e: True, attempts=2, within=60, wait=lambda n: 0)


def test_no_second_try_once_the_time_is_up():
    call, tries = _failing(9)
    with pytest.raises(Transient):
        retry(call, lambda e: True, attempts=5, within=0, wait=lambda n: 0)
    assert len(tries) == 1


def test_exponential_waits_as_tenacity():
    ours = exponential(0.05, 0.5)
    ref = tenacity.wait_exponential(multiplier=0.05, max=0.5)
    for n in range(1, 9):
        state = tenacity.RetryCallState(None, None, (), {})
        state.attempt_number = n
        assert ours(n) == pytest.approx(ref(state))
