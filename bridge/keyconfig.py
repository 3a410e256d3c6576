"""Noticing a key-rule change, so open incidents are not orphaned by it.

The key rule (mode, group_by labels, tenant) decides every incident key. When it
changes, the keys of alerts that are already open change too: their recoveries
would find no state and be ignored, leaving incidents open for ever. The bridge
remembers the rule in Redis; a process that starts with a different rule warns,
counts an anomaly and keeps the previous rule, which the pipeline uses to resolve
the incidents opened under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import structlog

log = structlog.get_logger("bridge.keyconfig")


@dataclass(frozen=True, slots=True)
class KeyRule:
    mode: str
    group_by: tuple[str, ...]
    tenant: str

    @classmethod
    def from_settings(cls, settings: Any) -> KeyRule:
        return cls(settings.dedup_key_mode, tuple(settings.dedup_group_by), settings.dedup_tenant)

    def dumps(self) -> str:
        return orjson.dumps([self.mode, list(self.group_by), self.tenant]).decode()

    @classmethod
    def loads(cls, raw: str | bytes) -> KeyRule:
        mode, group_by, tenant = orjson.loads(raw)
        return cls(mode, tuple(group_by), tenant)


def reconcile_key_rule(redis: Any, prefix: str, rule: KeyRule) -> KeyRule | None:
    """Record ``rule`` as current; return the previous rule if it differs (else None)."""
    key = f"{prefix}:keyrule"
    current, previous = redis.hmget(key, "current", "previous")
    if current is None:
        redis.hset(key, "current", rule.dumps())
        return None
    old = KeyRule.loads(current)
    if old == rule:
        return KeyRule.loads(previous) if previous else None
    log.warning(
        "anomaly: the incident key rule changed; open incidents keep being resolved "
        "under their old keys",
        old=old.dumps(),
        new=rule.dumps(),
    )
    redis.hset(key, mapping={"current": rule.dumps(), "previous": old.dumps()})
    return old
