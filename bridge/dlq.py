"""The dead-letter store: what could not be delivered, why, and how to try again.

Each entry is a Redis hash (``{prefix}:dlq:{id}``) indexed by a sorted set of
failure times, so entries can be listed by age, filtered, updated on replay and
removed once a replay succeeded. The store is trimmed to ``max_entries``, oldest
first. Replay itself lives in ``bridge.pipeline``: it runs the entry through the
normal decision path, so it never creates a duplicate.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from bridge.logs import redactor


class Reason(enum.StrEnum):
    """Why an entry is here: a closed set, the only label metrics use."""

    INVALID_PAYLOAD = "invalid_payload"
    ITSM_REJECTED = "itsm_rejected"
    ITSM_AUTH = "itsm_auth"
    RETRIES_EXHAUSTED = "retries_exhausted"
    AMBIGUOUS_CREATE = "ambiguous_create"
    POISON = "poison"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    reason: str
    detail: str
    kind: str  # "intake" (a whole message) or "action" (one alert's ITSM action)
    source: str
    key: str
    fmt: str
    payload: str  # JSON text of what to replay: the original message or the one alert
    attempts: int
    first_seen: float
    failed_at: float
    action: str = ""
    replays: int = 0
    last_replay_at: float = 0.0
    last_replay_result: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_INT_FIELDS = {"attempts", "replays"}
_FLOAT_FIELDS = {"first_seen", "failed_at", "last_replay_at"}


def _decode(raw: dict[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        name = k.decode() if isinstance(k, bytes) else k
        text = v.decode() if isinstance(v, bytes) else v
        if name in _INT_FIELDS:
            out[name] = int(text)
        elif name in _FLOAT_FIELDS:
            out[name] = float(text)
        else:
            out[name] = text
    return out


class DeadLetterStore:
    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = "bridge",
        max_entries: int = 100_000,
        clock: Callable[[], float],
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._max = max_entries
        self._clock = clock
        self._index = f"{prefix}:dlq:index"

    def _key(self, entry_id: str) -> str:
        return f"{self._prefix}:dlq:{entry_id}"

    def add(
        self,
        *,
        reason: Reason | str,
        detail: str,
        kind: str,
        source: str,
        key: str,
        fmt: str,
        payload: str,
        attempts: int,
        first_seen: float,
        action: str = "",
    ) -> str:
        """Store an entry and return its id. The detail is scrubbed of secrets first."""
        now = self._clock()
        entry_id = f"{int(now * 1000)}-{uuid.uuid4().hex[:8]}"
        fields = {
            "id": entry_id,
            "reason": str(reason),
            "detail": redactor.scrub(detail)[:2000],
            "kind": kind,
            "source": source,
            "key": key,
            "fmt": fmt,
            "payload": payload,
            "attempts": attempts,
            "first_seen": first_seen,
            "failed_at": now,
            "action": action,
            "replays": 0,
            "last_replay_at": 0.0,
            "last_replay_result": "",
        }
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._key(entry_id), mapping=fields)
        pipe.zadd(self._index, {entry_id: now})
        pipe.execute()
        self._trim()
        return entry_id

    def _trim(self) -> None:
        excess = self._redis.zcard(self._index) - self._max
        if excess > 0:
            oldest = [i.decode() for i in self._redis.zrange(self._index, 0, excess - 1)]
            for entry_id in oldest:
                self.remove(entry_id)

    def get(self, entry_id: str) -> DeadLetter | None:
        raw = self._redis.hgetall(self._key(entry_id))
        return DeadLetter(**_decode(raw)) if raw else None

    def _ids(self, newest_first: bool = False) -> Iterator[str]:
        raw = self._redis.zrange(self._index, 0, -1, desc=newest_first)
        for item in raw:
            yield item.decode() if isinstance(item, bytes) else item

    def list(
        self,
        *,
        reason: str | None = None,
        source: str | None = None,
        key: str | None = None,
        older_than_s: float | None = None,
        newer_than_s: float | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Entries oldest first, filtered by reason, source, key and age."""
        now = self._clock()
        found: list[DeadLetter] = []
        for entry_id in self._ids():
            entry = self.get(entry_id)
            if entry is None:
                continue
            age = now - entry.failed_at
            if reason and entry.reason != reason:
                continue
            if source and entry.source != source:
                continue
            if key and entry.key != key:
                continue
            if older_than_s is not None and age < older_than_s:
                continue
            if newer_than_s is not None and age > newer_than_s:
                continue
            found.append(entry)
            if limit and len(found) >= limit:
                break
        return found

    def count(self) -> int:
        return int(self._redis.zcard(self._index))

    def remove(self, entry_id: str) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._key(entry_id))
        pipe.zrem(self._index, entry_id)
        deleted, _ = pipe.execute()
        return bool(deleted)

    def mark_replayed(self, entry_id: str, result: str) -> None:
        """Record a replay that did not succeed (a successful one removes the entry)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(self._key(entry_id), "replays", 1)
        pipe.hset(
            self._key(entry_id),
            mapping={"last_replay_at": self._clock(), "last_replay_result": redactor.scrub(result)},
        )
        pipe.execute()
