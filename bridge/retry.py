"""The one retry function: how long to wait before the next attempt, or give up."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.itsm.errors import AmbiguousError, AuthError, ItsmError, PermanentError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    max_age_s: float = 3600.0
    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    retry_after_cap_s: float = 300.0

    @classmethod
    def from_settings(cls, settings: Any) -> RetryPolicy:
        return cls(
            max_attempts=settings.retry_max_attempts,
            max_age_s=settings.retry_max_age_s,
            base_delay_s=settings.retry_base_delay_s,
            max_delay_s=settings.retry_max_delay_s,
            retry_after_cap_s=settings.retry_after_cap_s,
        )


def next_delay(
    error: BaseException,
    attempt: int,
    first_seen: float,
    now: float,
    policy: RetryPolicy,
    rand: Callable[[float, float], float] = random.uniform,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or None to dead-letter now.

    ``attempt`` counts attempts made so far (1 after the first failure). Backoff is
    exponential with full jitter; a server's Retry-After is a floor, up to the cap.
    Permanent errors, and failures once the attempts or the age are spent, give None.
    """
    if isinstance(error, PermanentError) or not isinstance(error, ItsmError | OSError):
        return None
    if attempt >= policy.max_attempts:
        return None
    ceiling = min(policy.max_delay_s, policy.base_delay_s * (2 ** max(attempt - 1, 0)))
    delay = rand(0.0, ceiling)
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        delay = max(delay, min(float(retry_after), policy.retry_after_cap_s))
    if isinstance(error, AuthError):
        # credentials may be fixed in config meanwhile: keep trying, but never fast
        delay = max(delay, min(30.0, policy.max_delay_s))
    if isinstance(error, AmbiguousError):
        delay = max(delay, policy.base_delay_s)
    if now + delay - first_seen > policy.max_age_s:
        return None
    return delay
