"""next_delay: the retry schedule, specified."""

from __future__ import annotations

from bridge.itsm.errors import AmbiguousError, AuthError, PermanentError, TransientError
from bridge.retry import RetryPolicy, next_delay

POLICY = RetryPolicy(max_attempts=5, max_age_s=600, base_delay_s=1, max_delay_s=60)


def highest(low: float, high: float) -> float:
    return high


def lowest(low: float, high: float) -> float:
    return low


def test_permanent_error_dead_letters_at_once():
    assert next_delay(PermanentError("400"), 1, 0, 0, POLICY) is None


def test_unknown_exception_dead_letters_at_once():
    assert next_delay(ValueError("bug"), 1, 0, 0, POLICY) is None


def test_backoff_doubles_up_to_the_cap():
    delays = [next_delay(TransientError("x"), n, 0, 0, POLICY, highest) for n in range(1, 5)]
    assert delays == [1, 2, 4, 8]
    big = RetryPolicy(max_attempts=50, max_age_s=10**6, base_delay_s=1, max_delay_s=60)
    assert next_delay(TransientError("x"), 20, 0, 0, big, highest) == 60


def test_full_jitter_can_retry_at_once():
    assert next_delay(TransientError("x"), 3, 0, 0, POLICY, lowest) == 0


def test_retry_after_is_a_floor():
    error = TransientError("503", status=503, retry_after=2.0)
    assert next_delay(error, 1, 0, 0, POLICY, lowest) == 2.0


def test_retry_after_is_capped():
    error = TransientError("429", status=429, retry_after=10_000)
    assert next_delay(error, 1, 0, 0, POLICY, lowest) == POLICY.retry_after_cap_s


def test_attempts_are_bounded():
    assert next_delay(TransientError("x"), POLICY.max_attempts, 0, 0, POLICY) is None


def test_age_is_bounded():
    assert next_delay(TransientError("x"), 1, first_seen=0, now=601, policy=POLICY) is None


def test_auth_failures_wait_before_retrying():
    assert next_delay(AuthError("401"), 1, 0, 0, POLICY, lowest) == 30


def test_ambiguous_failures_never_retry_instantly():
    assert next_delay(AmbiguousError("502"), 1, 0, 0, POLICY, lowest) == POLICY.base_delay_s
