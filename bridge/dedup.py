"""The incident state machine over Redis: one atomic decision per alert.

Every step runs ``dedup.lua`` on one key's hash, so no interleaving of workers can
create two incidents for one key (claim before create), and a message delivered
twice gets the same decision twice (the step remembers the token of its last
transition). ``decide_many`` decides all alerts of one message in one script call
(one round trip), each alert with its own step on its own key, in order.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

from bridge.alert import Alert, Severity

_SCRIPT = Path(__file__).with_name("dedup.lua").read_text()
_SEVERITY_BY_RANK = {s.rank: s for s in Severity}
# Sources whose every delivery is a full snapshot re-sent unchanged on a timer: an identical
# delivery is not a new occurrence.
SNAPSHOT_SOURCES = frozenset({"alertmanager", "grafana"})


def content_digest(alert: Alert) -> str:
    """A short digest of what a person reads in the incident: summary, description, severity."""
    text = "\x1f".join((alert.summary, alert.description, alert.severity.value))
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class Decision(enum.StrEnum):
    """What one alert makes the bridge do; names are used in logs and metrics."""

    CREATE = "create"
    TAKEOVER = "takeover"  # the claim holder went silent: create (reconciling) in its place
    NEW_AFTER_WINDOW = "new_after_window"
    WAIT_FOR_CREATOR = "wait_for_creator"
    PENDING_RESOLVE = "pending_resolve"
    COUNT_ONLY = "count_only"
    SKIP_UNCHANGED = "skip_unchanged"
    COALESCED_UPDATE = "coalesced_update"
    RESOLVE = "resolve"
    HOLD_RESOLVE = "hold_resolve"
    REOPEN = "reopen"
    FLAPPING = "flapping"
    IGNORE_ORPHAN = "ignore_orphan"
    IGNORE_DUPLICATE = "ignore_duplicate"

    @property
    def acts(self) -> bool:
        """True when the decision needs an ITSM action."""
        return self in ACTING


ACTING = frozenset(
    {
        Decision.CREATE,
        Decision.TAKEOVER,
        Decision.NEW_AFTER_WINDOW,
        Decision.COALESCED_UPDATE,
        Decision.RESOLVE,
        Decision.HOLD_RESOLVE,
        Decision.REOPEN,
        Decision.FLAPPING,
    }
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer of one state-machine step, with what the action needs to know."""

    decision: str
    gen: int
    incident_id: int | None
    incident_display: str | None
    pending_count: int
    pending_since: float | None
    severity_written: Severity
    severity_peak: Severity
    previous_id: int | None
    previous_display: str | None
    hold: str | None  # kept as written by the script: settle compares it exactly

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> Outcome:
        dec, gen, iid, dn, n, ns, ws, ps, pid, pdn, hold = reply
        if type(dec) is not bytes:  # a client that decodes replies
            dec, dn, ns, pid, pdn, hold = (_text(v) for v in (dec, dn, ns, pid, pdn, hold))
            iid = _text(iid)
        # int() and float() read bytes and str alike; positional: the hot path of decide_many
        return cls(
            dec.decode() if type(dec) is bytes else dec,
            int(gen),
            int(iid) if iid else None,
            (dn.decode() if type(dn) is bytes else dn) or None,
            int(n),
            float(ns) if ns else None,
            _SEVERITY_BY_RANK.get(int(ws), Severity.WARNING),
            _SEVERITY_BY_RANK.get(int(ps), Severity.WARNING),
            int(pid) if pid else None,
            (pdn.decode() if type(pdn) is bytes else pdn) or None,
            (hold.decode() if type(hold) is bytes else hold) or None,
        )


def _text(v: Any) -> str:
    return v.decode() if type(v) is bytes else str(v)


@dataclass(frozen=True, slots=True)
class DedupPolicy:
    update_interval_s: float
    reopen_window_s: float
    claim_lease_s: float
    flap_threshold: int
    flap_window_s: float
    state_ttl_s: int
    group_mode: bool

    @classmethod
    def from_settings(cls, settings: Any) -> DedupPolicy:
        return cls(
            update_interval_s=settings.dedup_update_interval_s,
            reopen_window_s=settings.dedup_reopen_window_s,
            claim_lease_s=settings.dedup_claim_lease_s,
            flap_threshold=settings.dedup_flap_threshold,
            flap_window_s=settings.dedup_flap_window_s,
            state_ttl_s=settings.dedup_state_ttl_s,
            group_mode=settings.dedup_key_mode == "group_by",
        )


class StateStore:
    """Per-key incident state in Redis; every method is one atomic script call."""

    def __init__(
        self, redis: Any, policy: DedupPolicy, *, prefix: str = "bridge", clock: Callable[[], float]
    ) -> None:
        self._redis = redis
        self._policy = policy
        self._prefix = prefix
        self._clock = clock
        self._script = redis.register_script(_SCRIPT)

    def state_key(self, key: str) -> str:
        return f"{self._prefix}:inc:{key}"

    def _keys(self, key: str) -> list[str]:
        return [self.state_key(key), f"{self._prefix}:mem:{key}"]

    def _run(self, op: str, key: str, token: str, *extra: Any, client: Any = None) -> Any:
        args = [op, repr(self._clock()), token, self._policy.state_ttl_s, *extra]
        return self._script(keys=self._keys(key), args=args, client=client)

    def decide_many(self, alerts: Sequence[Alert], tokens: Sequence[str]) -> list[Outcome]:
        """Decide every alert of one message in one script call (one round trip), in order.

        Each alert is its own step on its own key, exactly as ``decide``; the call also
        counts the alerts in ``{prefix}:stats`` (field ``alerts``), which is how operators
        and tests account for every alert taken off the broker.
        """
        if not alerts:
            return []
        p = self._policy
        prefix = self._prefix
        group = p.group_mode
        keys = [f"{prefix}:stats"]
        argv: list[Any] = [
            "decide_many",
            repr(self._clock()),
            "",
            p.state_ttl_s,
            p.update_interval_s,
            p.reopen_window_s,
            p.claim_lease_s,
            p.flap_threshold,
            p.flap_window_s,
            "1" if group else "0",
        ]
        for alert, token in zip(alerts, tokens, strict=True):
            key = alert.key
            keys.append(f"{prefix}:inc:{key}")
            argv += (
                token,
                alert.status.value,
                alert.severity.rank,
                content_digest(alert),
                "1" if alert.source in SNAPSHOT_SOURCES else "0",
            )
            if group:
                keys.append(f"{prefix}:mem:{key}")
                argv.append(alert.identity)
        # EVALSHA straight away: a Script object would send SCRIPT EXISTS first, one more
        # round trip per message.
        sha = self._script.sha
        try:
            replies = self._redis.evalsha(sha, len(keys), *keys, *argv)
        except NoScriptError:
            # Redis restarted or its script cache was flushed: load it and decide (nothing
            # ran: a script that is not there does not start).
            self._redis.script_load(_SCRIPT)
            replies = self._redis.evalsha(sha, len(keys), *keys, *argv)
        return [Outcome.from_reply(r) for r in replies]

    def decide(self, alert: Alert, token: str) -> Outcome:
        return self.decide_many([alert], [token])[0]

    def mark_inflight(self, key: str, token: str) -> Outcome:
        """Mark a create as about to be sent.

        Answers 'first', 'reconcile' (an earlier try may have landed) or 'stale'.
        """
        return Outcome.from_reply(self._run("inflight", key, token))

    def mark_not_applied(self, key: str, token: str) -> None:
        """The create was refused for certain (nothing applied): no reconcile needed next time."""
        self._run("not_applied", key, token)

    def record_created(
        self, key: str, token: str, incident_id: int, display: str | None
    ) -> Outcome:
        """'open', 'resolve' (a resolve arrived meanwhile) or 'stale' (not our claim)."""
        return Outcome.from_reply(self._run("created", key, token, incident_id, display or ""))

    def release_claim(self, key: str, token: str, *, hold_if_inflight: bool = False) -> Outcome:
        """Forget a given-up create's claim: 'released', 'held' or 'stale'.

        With ``hold_if_inflight`` a claim whose create may have been applied is kept
        ('held'): the key then waits for an operator instead of creating again.
        """
        return Outcome.from_reply(
            self._run("release", key, token, "1" if hold_if_inflight else "0")
        )

    def settle(self, key: str, token: str, hold: str) -> Outcome:
        return Outcome.from_reply(self._run("settle", key, token, hold))

    def recreate(self, key: str, token: str) -> Outcome:
        return Outcome.from_reply(self._run("recreate", key, token))

    def current_gen(self, key: str) -> int:
        raw = self._redis.hget(self.state_key(key), "gen")
        return int(raw) if raw else 0

    def snapshot(self, key: str) -> dict[str, str]:
        """The raw state hash, for ``bridge`` diagnostics and tests."""
        raw = self._redis.hgetall(self.state_key(key))
        return {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
