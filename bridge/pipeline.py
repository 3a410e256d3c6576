"""The path of an alert: parse -> key -> decide -> act -> record.

``Pipeline.intake`` turns one broker message into decisions (one Redis round trip
for the whole message) and hands every decision that needs the ITSM to an
``ActionSink`` as an ``Action``. ``Pipeline.run_action`` performs one action under
the key's lock, and on failure either reschedules it (``next_delay``) or
dead-letters it. Nothing here knows Celery: ``workers/`` supplies a sink that
publishes, ``bridge run``'s replay and tests may supply one that runs inline.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import structlog

from bridge import keys, sources
from bridge.alert import Alert, Severity, Status
from bridge.dedup import ACTING, Decision, Outcome, StateStore
from bridge.dlq import DeadLetter, DeadLetterStore, Reason
from bridge.itsm.client import key_tag
from bridge.itsm.errors import (
    AmbiguousError,
    AuthError,
    ItsmError,
    PermanentError,
    TransientError,
)
from bridge.itsm.guard import GuardRefusal, low_priority
from bridge.itsm.model import Incident, IncidentRef
from bridge.keyconfig import KeyRule
from bridge.retry import RetryPolicy, next_delay

log = structlog.get_logger("bridge.pipeline")

CANONICAL = "canonical"  # an internal format: {"alerts": [Alert.to_dict(), ...]}
_CREATES = frozenset({Decision.CREATE, Decision.TAKEOVER, Decision.NEW_AFTER_WINDOW})
URGENT = "urgent"
UPDATES = "updates"
_MAX_STORED_PAYLOAD = 256 * 1024
# A message redelivered this often (its worker died each time) is dead-lettered as poison.
POISON_DELIVERIES = 5


def envelope(fmt: str, payload: Any, *, received_at: float | None = None) -> dict[str, Any]:
    """The body of an intake message: the payload as received, its format, and when."""
    return {
        "v": 1,
        "id": uuid.uuid4().hex,
        "format": fmt,
        "payload": payload,
        "received_at": time.time() if received_at is None else received_at,
    }


@dataclass(frozen=True, slots=True)
class Action:
    """One ITSM effect one decision asked for; JSON-serialisable for the broker."""

    decision: str
    key: str
    token: str
    gen: int
    alert: dict[str, Any]
    first_seen: float
    incident_id: int | None = None
    incident_display: str | None = None
    pending_count: int = 0
    pending_since: float | None = None
    severity_written: str = "warning"
    severity_peak: str = "warning"
    previous_id: int | None = None
    previous_display: str | None = None
    hold: str | None = None
    attempt: int = 0

    @property
    def lane(self) -> str:
        """Creates, resolves and reopens go before cosmetic updates."""
        return UPDATES if self.decision == Decision.COALESCED_UPDATE else URGENT

    def to_dict(self) -> dict[str, Any]:
        # shallow: every caller serialises it at once (asdict's deep copy cost more)
        return {name: getattr(self, name) for name in _ACTION_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Action:
        return cls(**data)

    @classmethod
    def from_outcome(cls, alert: Alert, token: str, outcome: Outcome, first_seen: float) -> Action:
        return cls(
            decision=outcome.decision,
            key=alert.key,
            token=token,
            gen=outcome.gen,
            alert=alert.to_dict(),
            first_seen=first_seen,
            incident_id=outcome.incident_id,
            incident_display=outcome.incident_display,
            pending_count=outcome.pending_count,
            pending_since=outcome.pending_since,
            severity_written=outcome.severity_written.value,
            severity_peak=outcome.severity_peak.value,
            previous_id=outcome.previous_id,
            previous_display=outcome.previous_display,
            hold=outcome.hold,
        )

    @property
    def ref(self) -> IncidentRef | None:
        if self.incident_id is None:
            return None
        return IncidentRef(self.incident_id, self.incident_display)


_ACTION_FIELDS = tuple(f.name for f in fields(Action))


class ActionSink(Protocol):
    def submit(self, action: Action, countdown: float = 0.0) -> None: ...


class KeyBusy(Exception):
    """Another action on the same key holds its lock; try again shortly."""


class AmbiguousCreate(Exception):
    """A create may have been applied and the ITSM cannot be searched to find out."""


@dataclass
class IntakeResult:
    alerts: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    actions: int = 0
    dead_letter: str | None = None


@dataclass(frozen=True)
class ActionResult:
    status: str  # done | stale | rescheduled | dead_lettered | busy
    detail: str = ""
    incident: IncidentRef | None = None
    retry_in: float | None = None


_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Pipeline:
    """Business logic of the bridge, wired to its collaborators by the caller."""

    def __init__(
        self,
        *,
        settings: Any,
        redis: Any,
        store: StateStore,
        dlq: DeadLetterStore,
        client_factory: Callable[[], Any],
        mapper: Any,
        sink: ActionSink,
        clock: Callable[[], float] = time.time,
        observer: Any = None,
    ) -> None:
        self.settings = settings
        self._redis = redis
        self.store = store
        self.dlq = dlq
        self._client_factory = client_factory
        self._client: Any = None
        self.mapper = mapper
        self.sink = sink
        self._clock = clock
        self._retry = RetryPolicy.from_settings(settings)
        self._release = redis.register_script(_RELEASE_LOCK)
        self._observer = observer
        self.previous_key_rule: KeyRule | None = None

    @property
    def client(self) -> Any:
        # Created on first use, so a prefork child builds its own HTTP session after fork.
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _observe(self, name: str, **labels: Any) -> None:
        if self._observer is not None:
            self._observer(name, **labels)

    # ---------------------------------------------------------------- intake

    def parse(self, fmt: str, payload: Any) -> list[Alert]:
        """Canonical alerts, keyed; raises sources.InvalidPayload naming the field."""
        if fmt == CANONICAL:
            alerts = [Alert.from_dict(a) for a in payload["alerts"]]
        else:
            if isinstance(payload, dict) and "__undecodable__" in payload:
                raise sources.InvalidPayload("body", "not UTF-8 text")
            if isinstance(payload, (bytes, str)):
                payload = sources.decode(payload.encode() if isinstance(payload, str) else payload)
            if fmt == "auto":
                detected = sources.detect(payload)
                if detected is None:
                    raise sources.InvalidPayload(
                        "format", "cannot tell the format; name it in the x-alert-format header"
                    )
                fmt = detected
            alerts = sources.parse(fmt, payload)
        s = self.settings
        # the alerts were just built from the payload: keyed in place, not copied
        return keys.key_parsed(
            alerts, mode=s.dedup_key_mode, group_by=tuple(s.dedup_group_by), tenant=s.dedup_tenant
        )

    def _too_many_deliveries(self, message_id: str) -> bool:
        """Count a redelivery; True once a message keeps coming back (it kills its worker)."""
        key = f"{self.settings.redis_prefix}:deliveries:{message_id}"
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 86400)
        count = int(pipe.execute()[0])
        return count > POISON_DELIVERIES

    def intake(
        self, message: dict[str, Any], message_id: str, *, redelivered: bool = False
    ) -> IntakeResult:
        """Decide every alert of one message and submit the actions they need."""
        return self.intake_many([(message, message_id)], redelivered=redelivered)[0]

    def intake_many(
        self, messages: Sequence[tuple[Any, str]], *, redelivered: bool = False
    ) -> list[IntakeResult]:
        """Decide the alerts of several messages in one Redis round trip, in order.

        Each message keeps its own result, its own dead letter when it is invalid, and
        its own tokens (``{message_id}:{i}``): a message decided here and then again on
        its own (a batch that failed comes back one message at a time) makes the same
        decisions, exactly as a message delivered twice does.
        """
        results = [IntakeResult() for _ in messages]
        batch: list[tuple[IntakeResult, str, float, list[Alert]]] = []
        for result, (message, message_id) in zip(results, messages, strict=True):
            parsed = self._parse_message(result, message, message_id, redelivered)
            if parsed is not None:
                batch.append((result, message_id, *parsed))
        alerts = [alert for *_, parsed_alerts in batch for alert in parsed_alerts]
        if not alerts:
            return results
        self._observe("intake_batch", messages=len(batch))
        tokens = [
            f"{message_id}:{i}"
            for _, message_id, _, parsed_alerts in batch
            for i in range(len(parsed_alerts))
        ]
        outcomes = self.store.decide_many(alerts, tokens)
        if self.previous_key_rule is not None:
            alerts, outcomes = self._retry_orphans_with_previous_rule(alerts, tokens, outcomes)
        # Skipped outright when the level drops them: the processors (redaction, time
        # stamps) would otherwise run for every alert before the level is looked at.
        info = _log_enabled(logging.INFO)
        log_each = info and self.settings.log_every_decision
        counts: dict[str, int] = {}
        at = 0
        for result, message_id, received_at, parsed_alerts in batch:
            end = at + len(parsed_alerts)
            for alert, token, outcome in zip(
                alerts[at:end], tokens[at:end], outcomes[at:end], strict=True
            ):
                decision = outcome.decision
                result.decisions[decision] = result.decisions.get(decision, 0) + 1
                if log_each:
                    log.info(
                        decision,
                        key=alert.key,
                        decision=decision,
                        source=alert.source,
                        status=alert.status.value,
                        incident_id=outcome.incident_id,
                        message_id=message_id,
                    )
                if decision in ACTING:
                    self.sink.submit(Action.from_outcome(alert, token, outcome, received_at))
                    result.actions += 1
            at = end
            for decision, count in result.decisions.items():
                counts[decision] = counts.get(decision, 0) + count
            if info and _log_enabled(logging.DEBUG):
                log.debug(
                    "message decided",
                    message_id=message_id,
                    alerts=len(parsed_alerts),
                    **result.decisions,
                )
        # once per decision of the call, not once per alert (a batch has hundreds)
        for decision, count in counts.items():
            self._observe("decision", decision=decision, count=count)
        return results

    def _parse_message(
        self, result: IntakeResult, message: Any, message_id: str, redelivered: bool
    ) -> tuple[float, list[Alert]] | None:
        """The message's alerts and when it was received; None when it was dead-lettered."""
        if not isinstance(message, dict):
            # Placed on the queue by hand or by a foreign producer: keep it, say why.
            detail = f"the intake message is a {type(message).__name__}, not an envelope object"
            result.dead_letter = self._dead_letter_message(
                {"payload": message}, Reason.INVALID_PAYLOAD, detail
            )
            self._observe("rejected", source="unknown", reason="invalid_payload")
            return None
        if redelivered and self._too_many_deliveries(message_id):
            detail = f"delivered more than {POISON_DELIVERIES} times; it stops its worker"
            result.dead_letter = self._dead_letter_message(message, Reason.POISON, detail)
            return None
        fmt = str(message.get("format", ""))
        received_at = self._received_at(message)
        try:
            alerts = self.parse(fmt, message.get("payload"))
        except sources.InvalidPayload as exc:
            result.dead_letter = self._dead_letter_message(
                message, Reason.INVALID_PAYLOAD, str(exc)
            )
            self._observe("rejected", source=fmt or "unknown", reason="invalid_payload")
            return None
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"cannot read the message: {type(exc).__name__}: {exc}"
            result.dead_letter = self._dead_letter_message(message, Reason.INVALID_PAYLOAD, detail)
            self._observe("rejected", source=fmt or "unknown", reason="invalid_payload")
            return None
        result.alerts = len(alerts)
        return received_at, alerts

    def _retry_orphans_with_previous_rule(
        self, alerts: list[Alert], tokens: list[str], outcomes: list[Outcome]
    ) -> tuple[list[Alert], list[Outcome]]:
        """Recoveries that found no state under the new key rule try the previous rule."""
        rule = self.previous_key_rule
        assert rule is not None
        orphans = [
            i
            for i, (a, o) in enumerate(zip(alerts, outcomes, strict=True))
            if o.decision == Decision.IGNORE_ORPHAN and a.status is Status.RESOLVED
        ]
        if not orphans:
            return alerts, outcomes
        old_keys = [
            keys.with_key(alerts[i], mode=rule.mode, group_by=rule.group_by, tenant=rule.tenant)
            for i in orphans
        ]
        retried = self.store.decide_many(old_keys, [f"{tokens[i]}:old" for i in orphans])
        alerts, outcomes = list(alerts), list(outcomes)
        for i, alert, outcome in zip(orphans, old_keys, retried, strict=True):
            alerts[i], outcomes[i] = alert, outcome
        return alerts, outcomes

    def _received_at(self, message: dict[str, Any]) -> float:
        """When the ingest accepted the message; now when the envelope does not say."""
        value = message.get("received_at")
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
        return self._clock()

    def _dead_letter_message(self, message: dict[str, Any], reason: Reason, detail: str) -> str:
        payload = message.get("payload")
        try:
            text = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
        except TypeError:
            text = repr(payload)
        if len(text) > _MAX_STORED_PAYLOAD:
            # a huge poison payload must not turn the dead-letter store into the next problem
            text = text[:_MAX_STORED_PAYLOAD] + f"...[truncated, {len(text)} characters in all]"
        entry_id = self.dlq.add(
            reason=reason,
            detail=detail,
            kind="intake",
            source=str(message.get("format", "")),
            key="",
            fmt=str(message.get("format", "")),
            payload=text,
            attempts=1,
            first_seen=self._received_at(message),
        )
        log.warning("dead-lettered", reason=str(reason), detail=detail, dlq_id=entry_id)
        self._observe("dead_letter", reason=str(reason))
        return entry_id

    # --------------------------------------------------------------- actions

    def run_action(
        self, data: dict[str, Any], *, message_id: str = "", redelivered: bool = False
    ) -> ActionResult:
        """Perform one action; reschedule or dead-letter it when the ITSM fails."""
        action = Action.from_dict(data)
        bound = log.bind(key=action.key, decision=action.decision, attempt=action.attempt + 1)
        if redelivered and message_id and self._too_many_deliveries(message_id):
            detail = f"delivered more than {POISON_DELIVERIES} times; it stops its worker"
            return self._give_up(action, Reason.POISON, detail, bound)
        try:
            result = self.perform(action)
        except KeyBusy:
            # spread the retries of actions queued behind the same key
            pause = 0.2 + (hash(action.token) % 300) / 1000
            self.sink.submit(action, countdown=pause)
            return ActionResult("busy", retry_in=pause)
        except AmbiguousCreate as exc:
            return self._give_up(action, Reason.AMBIGUOUS_CREATE, str(exc), bound)
        except GuardRefusal as exc:
            # Held back by our own rate limit or open circuit: not a failed attempt. Only
            # the alert's age bounds how long it may wait.
            pause = (exc.retry_after or 1.0) + random.uniform(0, 0.5)
            if self._clock() + pause - action.first_seen > self._retry.max_age_s:
                return self._give_up(action, Reason.RETRIES_EXHAUSTED, _detail(exc), bound)
            self._observe("retry", reason=exc.reason)
            self.sink.submit(action, countdown=pause)
            return ActionResult("rescheduled", _detail(exc), retry_in=pause)
        except (ItsmError, OSError) as exc:
            attempt = action.attempt + 1
            delay = next_delay(exc, attempt, action.first_seen, self._clock(), self._retry)
            self._observe("itsm_failure", reason=getattr(exc, "reason", "network"))
            if delay is None:
                reason = _reason_for(exc, attempt, self._retry)
                return self._give_up(replace(action, attempt=attempt), reason, _detail(exc), bound)
            bound.info("retrying", error=_detail(exc), retry_in=round(delay, 3))
            self._observe("retry", reason=getattr(exc, "reason", "network"))
            self.sink.submit(replace(action, attempt=attempt), countdown=delay)
            return ActionResult("rescheduled", _detail(exc), retry_in=delay)
        return result

    def _give_up(self, action: Action, reason: Reason, detail: str, bound: Any) -> ActionResult:
        if action.decision in _CREATES:
            released = self._release_create(action)
            if released.decision == "held":
                detail = (
                    f"{detail} (the key waits: `bridge dlq adopt ENTRY --incident ID` if the "
                    "incident exists, `bridge dlq replay ENTRY` if it does not)"
                )
        alert = action.alert
        entry_id = self.dlq.add(
            reason=reason,
            detail=detail,
            kind="action",
            source=alert.get("source", ""),
            key=action.key,
            fmt=CANONICAL,
            payload=orjson.dumps(action.to_dict()).decode(),
            attempts=max(action.attempt, 1),
            first_seen=action.first_seen,
            action=action.decision,
        )
        bound.warning(f"dead-lettered: {reason}", detail=detail, dlq_id=entry_id)
        self._observe("dead_letter", reason=str(reason))
        return ActionResult("dead_lettered", detail)

    def _release_create(self, action: Action) -> Outcome:
        # Where the ITSM cannot be searched, a create that may have landed keeps its claim:
        # releasing it would let the next alert of the key create a second incident.
        hold = not self.client.can_search and self.settings.itsm_ambiguous_create != "create"
        return self.store.release_claim(action.key, action.token, hold_if_inflight=hold)

    def perform(self, action: Action) -> ActionResult:
        """One action under the key's lock; raises ItsmError for the caller to retry."""
        lock_key = f"{self.settings.redis_prefix}:lock:{action.key}"
        lock_token = uuid.uuid4().hex
        lease_ms = int(self.settings.dedup_lock_lease_s * 1000)
        if not self._redis.set(lock_key, lock_token, nx=True, px=lease_ms):
            raise KeyBusy(action.key)
        try:
            return self._perform_locked(action)
        finally:
            self._release(keys=[lock_key], args=[lock_token])

    def _perform_locked(self, action: Action) -> ActionResult:
        decision = Decision(action.decision)
        if decision in _CREATES:
            return self._create(action)
        if decision == Decision.HOLD_RESOLVE:
            countdown = float(self.settings.dedup_flap_quiet_s)
            self.sink.submit(replace(action, decision="settle"), countdown=countdown)
            return ActionResult("done", "resolve held while flapping")
        if self.store.current_gen(action.key) != action.gen:
            log.info("superseded", key=action.key, decision=action.decision)
            return ActionResult("stale", "a later decision superseded this action")
        ref = action.ref
        if ref is None:
            return ActionResult("stale", "no incident recorded for this key")
        if decision == Decision.COALESCED_UPDATE:
            with low_priority():
                return self._update(action, ref)
        if decision == Decision.RESOLVE:
            return self._resolve(action, ref)
        return self._reopen(action, ref, flapping=decision == Decision.FLAPPING)

    def _create(self, action: Action) -> ActionResult:
        client = self.client
        mark = self.store.mark_inflight(action.key, action.token)
        if mark.decision == "stale":
            return ActionResult("stale", "the claim moved on")
        ref = None
        if mark.decision == "reclaimed":
            log.warning("state lost before the create; re-claimed", key=action.key)
        if client.can_search:
            # Searching first also survives a lost Redis: the key's tag finds the incident.
            ref = self._find_open(action.key)
        elif mark.decision in {"reconcile", "reclaimed"}:
            policy = self.settings.itsm_ambiguous_create
            if policy != "create":
                raise AmbiguousCreate(
                    "an earlier create for this key may have been applied and this ITSM "
                    "cannot be searched; look for the incident tagged with the key"
                )
        alert = Alert.from_dict(action.alert)
        adopted = ref is not None
        if ref is None:
            draft = self.mapper.draft(alert)
            if action.previous_id is not None:
                previous = action.previous_display or f"#{action.previous_id}"
                draft = replace(
                    draft,
                    description=f"Relapse of {previous}.\n\n{draft.description}",
                )
            try:
                ref = client.create(draft, action.key)
            except (TransientError, AuthError, PermanentError):
                # refused for certain: nothing was applied, so no reconcile next time
                self.store.mark_not_applied(action.key, action.token)
                raise
        recorded = self.store.record_created(action.key, action.token, ref.id, ref.display)
        verb = "adopted" if adopted else "created"
        log.info(f"{verb} {ref}", key=action.key, incident_id=ref.id, incident=str(ref))
        self._observe("effect", effect="adopted" if adopted else "created")
        self._observe_latency(action)
        if recorded.decision == "resolve":
            self._apply_resolution(action, ref)
        return ActionResult("done", verb, incident=ref)

    def _find_open(self, key: str) -> IncidentRef | None:
        found: list[Incident] = self.client.find_by_key(key)
        closed = {s.lower() for s in self.settings.itsm_closed_statuses}
        closed.add(self.settings.itsm_resolved_status.lower())
        open_ones = [i for i in found if i.status.lower() not in closed]
        if len(open_ones) > 1:
            log.warning("anomaly: several open incidents carry one key", key=key, count=len(found))
            self._observe("anomaly", kind="several_open")
        if not open_ones:
            return None
        newest = max(open_ones, key=lambda i: (i.created_ms or 0, i.ref.id))
        return newest.ref

    def _update(self, action: Action, ref: IncidentRef) -> ActionResult:
        client = self.client
        written, peak = Severity(action.severity_written), Severity(action.severity_peak)
        notes = []
        if peak.rank > written.rank:
            priority = self.mapper.priority_for(peak)
            client.update(ref, priority=priority, urgency=priority)
            notes.append(self.mapper.note_for_severity_change(written, peak))
        elif peak.rank < written.rank:
            notes.append(self.mapper.note_for_severity_change(written, peak))
        if action.pending_count and self.settings.dedup_note_occurrences:
            since = datetime.fromtimestamp(action.pending_since or action.first_seen, UTC)
            notes.append(self.mapper.note_for_occurrences(action.pending_count, since))
        if notes:
            client.add_note(ref, "\n".join(notes))
        log.info(
            f"folded {action.pending_count} occurrences into {ref}",
            key=action.key,
            incident=str(ref),
        )
        self._observe("effect", effect="updated")
        return ActionResult("done", "updated", incident=ref)

    def _resolve(self, action: Action, ref: IncidentRef) -> ActionResult:
        self._apply_resolution(action, ref)
        return ActionResult("done", "resolved", incident=ref)

    def _apply_resolution(self, action: Action, ref: IncidentRef) -> None:
        mode = self.settings.dedup_on_resolve
        if mode == "resolve":
            self.client.resolve(ref)
        elif mode == "note":
            self.client.add_note(
                ref, self.mapper.note_for_resolution(Alert.from_dict(action.alert))
            )
        log.info(
            f"resolved {ref}" if mode == "resolve" else f"recovery: {mode}",
            key=action.key,
            incident_id=ref.id,
            incident=str(ref),
            source=action.alert.get("source"),
        )
        self._observe("effect", effect="resolved")
        self._observe_latency(action)

    def _reopen(self, action: Action, ref: IncidentRef, *, flapping: bool) -> ActionResult:
        client = self.client
        incident = client.get(ref)
        if key_tag(action.key) not in incident.tags:
            # Someone removed or changed the key tag, or the id now names another record.
            log.warning(
                "anomaly: incident does not carry its key", key=action.key, incident=str(ref)
            )
            self._observe("anomaly", kind="key_mismatch")
        closed = {s.lower() for s in self.settings.itsm_closed_statuses}
        if incident.status.lower() in closed:
            # A person's decision wins: never reopen it; open a new one that points back.
            token = f"{action.token}:recreate"
            outcome = self.store.recreate(action.key, token)
            if outcome.decision != Decision.NEW_AFTER_WINDOW:
                return ActionResult("stale", "state moved on before the recreate")
            log.info(f"{ref} was closed by a person: opening a new incident", key=action.key)
            return self._create(
                replace(
                    action,
                    token=token,
                    decision=outcome.decision,
                    gen=outcome.gen,
                    previous_id=ref.id,
                    previous_display=ref.display,
                )
            )
        client.reopen(ref)
        if flapping:
            client.add_note(
                ref,
                self.mapper.note_for_flapping(
                    self.settings.dedup_flap_threshold, self.settings.dedup_flap_window_s
                ),
            )
        log.info(
            f"reopened {ref}" + (" (flapping)" if flapping else ""),
            key=action.key,
            incident_id=ref.id,
            incident=str(ref),
            source=action.alert.get("source"),
        )
        self._observe("effect", effect="reopened")
        return ActionResult("done", "reopened", incident=ref)

    def settle(self, data: dict[str, Any]) -> ActionResult:
        """Apply a flapping incident's held resolve if it stayed resolved."""
        action = Action.from_dict(data)
        if action.hold is None:
            return ActionResult("stale", "nothing held")
        outcome = self.store.settle(action.key, f"{action.token}:settle", action.hold)
        if outcome.decision != Decision.RESOLVE:
            return ActionResult("stale", "relapsed since")
        settled = replace(
            action,
            decision=Decision.RESOLVE.value,
            gen=outcome.gen,
            token=f"{action.token}:settle",
            hold=None,
            attempt=0,
        )
        self.sink.submit(settled)
        return ActionResult("done", "resolve released")

    def _observe_latency(self, action: Action) -> None:
        self._observe("latency", seconds=max(0.0, self._clock() - action.first_seen))

    # ---------------------------------------------------------------- replay

    def replay(self, entry: DeadLetter) -> ActionResult:
        """Run a dead letter through the normal path again, inline; never a blind create."""
        if entry.kind == "intake":
            message = {"format": entry.fmt, "payload": entry.payload, "received_at": self._clock()}
            result = self.intake(message, f"replay-{entry.id}-{uuid.uuid4().hex[:6]}")
            if result.dead_letter:
                self.dlq.remove(result.dead_letter)
                return ActionResult("failed", "the payload is still invalid")
            return ActionResult("done", f"{result.alerts} alerts, {result.actions} actions")
        action = Action.from_dict(orjson.loads(entry.payload))
        if action.decision in _CREATES:
            if entry.reason == Reason.AMBIGUOUS_CREATE:
                # The operator looked and found no incident: drop the held claim.
                self.store.release_claim(action.key, action.token)
            # The claim was released when this was dead-lettered: decide again, so an
            # incident created meanwhile is found instead of created twice.
            alert = Alert.from_dict(action.alert)
            token = f"replay-{entry.id}-{uuid.uuid4().hex[:6]}"
            outcome = self.store.decide(alert, token)
            if not Decision(outcome.decision).acts:
                return ActionResult("done", f"nothing to do ({outcome.decision})")
            action = Action.from_outcome(alert, token, outcome, self._clock())
        try:
            return self.perform(replace(action, attempt=0, first_seen=self._clock()))
        except (ItsmError, OSError, KeyBusy, AmbiguousCreate) as exc:
            if action.decision in _CREATES:
                self._release_create(action)
            return ActionResult("failed", _detail(exc))

    def adopt(self, entry: DeadLetter, incident_id: int) -> ActionResult:
        """Record that a dead-lettered create did land, as incident ``incident_id``.

        The operator's answer to an ambiguous create on an ITSM that cannot be searched:
        the key's held claim becomes that incident, and what the key saw meanwhile
        (occurrences, a resolve) is applied to it.
        """
        if entry.kind != "action":
            return ActionResult("failed", "only a dead-lettered create can be adopted")
        action = Action.from_dict(orjson.loads(entry.payload))
        if action.decision not in _CREATES:
            return ActionResult("failed", f"the entry is a {action.decision}, not a create")
        try:
            ref = self.client.get(IncidentRef(incident_id)).ref
            recorded = self.store.record_created(action.key, action.token, ref.id, ref.display)
            if recorded.decision == "stale":
                return ActionResult(
                    "failed", "the key is not waiting for a create any more; nothing adopted"
                )
            log.info(f"adopted {ref}", key=action.key, incident_id=ref.id, dlq_id=entry.id)
            self._observe("effect", effect="adopted")
            if recorded.decision == "resolve":
                self._apply_resolution(action, ref)
        except (ItsmError, OSError) as exc:
            return ActionResult("failed", _detail(exc))
        return ActionResult("done", f"adopted {ref}", incident=ref)


_stdlib_log = logging.getLogger("bridge.pipeline")


def _log_enabled(level: int) -> bool:
    """False when ``log``'s lines at ``level`` would be dropped by the stdlib level."""
    if not isinstance(structlog.get_config()["logger_factory"], structlog.stdlib.LoggerFactory):
        return True  # structlog on its own (not routed through stdlib): no level to consult
    return _stdlib_log.isEnabledFor(level)


def _detail(exc: BaseException) -> str:
    server = getattr(exc, "server_message", None)
    text = str(exc)
    if server and server not in text:
        text = f"{text}: {server}"
    return text


def _reason_for(exc: BaseException, attempt: int, policy: RetryPolicy) -> Reason:
    if isinstance(exc, PermanentError):
        return Reason.ITSM_REJECTED
    if isinstance(exc, AuthError):
        return Reason.ITSM_AUTH
    if isinstance(exc, AmbiguousError):
        return Reason.RETRIES_EXHAUSTED
    return Reason.RETRIES_EXHAUSTED
