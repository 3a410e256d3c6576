"""The incident key: which alerts share one incident.

``incident_key`` is the first 32 hex digits (128 bits) of a sha256 over a
length-prefixed encoding of its parts, so no choice of strings can make two
different part lists encode alike (("a|b", "c") and ("a", "b|c") differ), the tenant
is always one of the parts (TEST and PROD never share a key), and the result is the
same in every process and on every machine (no Python ``hash()``).

Modes:

- ``identity``: (tenant, source, identity) — one incident per alert as its source
  identifies it (Alertmanager/Grafana fingerprint, PagerDuty dedup_key, generic key).
- ``group_by``: (tenant, the ``group_by`` labels the alert has, sorted by name, each
  with its value) — one incident per group, whatever the source. An alert that has
  none of those labels falls back to its identity key rather than joining a
  catch-all group of every such alert.

Changing the mode, the labels or the tenant changes the keys of open incidents.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from bridge.alert import Alert

if TYPE_CHECKING:
    from bridge.settings import Settings

MODES = ("identity", "group_by")
KEY_CHARS = 32
# Bumped if the encoding ever changes, so old and new keys can never be confused.
_VERSION = "k1"


def incident_key(alert: Alert, *, mode: str, group_by: tuple[str, ...], tenant: str) -> str:
    """The key of the incident ``alert`` belongs to (32 lowercase hex digits)."""
    if mode == "identity":
        return _digest((_VERSION, "identity", tenant, alert.source, alert.identity))
    if mode == "group_by":
        labels = alert.labels
        present = sorted(name for name in set(group_by) if name in labels)
        if not present:
            return _digest((_VERSION, "identity", tenant, alert.source, alert.identity))
        parts = [_VERSION, "group", tenant]
        for name in present:
            parts += (name, labels[name])
        return _digest(parts)
    raise ValueError(f"unknown key mode {mode!r}; expected one of {', '.join(MODES)}")


def with_key(
    alert: Alert,
    settings: Settings | None = None,
    *,
    mode: str | None = None,
    group_by: tuple[str, ...] | None = None,
    tenant: str | None = None,
) -> Alert:
    """``alert`` with its incident key set, by the ``[dedup]`` settings or explicit values.

    Explicit ``mode``/``group_by``/``tenant`` win over ``settings``.
    """
    if settings is not None:
        mode = mode if mode is not None else settings.dedup_key_mode
        group_by = group_by if group_by is not None else settings.dedup_group_by
        tenant = tenant if tenant is not None else settings.dedup_tenant
    if mode is None or group_by is None or tenant is None:
        raise TypeError("with_key needs settings or all of mode, group_by and tenant")
    key = incident_key(alert, mode=mode, group_by=tuple(group_by), tenant=tenant)
    return dataclasses.replace(alert, key=key)


def key_parsed(
    alerts: list[Alert], *, mode: str, group_by: tuple[str, ...], tenant: str
) -> list[Alert]:
    """Set the incident key of alerts just parsed, in place, and return them.

    The same keys as ``with_key`` for each alert, without copying every alert: only
    for alerts nobody else holds yet (a parser's fresh output); everywhere else an
    ``Alert`` is immutable. In identity mode the parts before the identity are the
    same for a whole payload and are encoded once per source.
    """
    if mode != "identity":
        group_by = tuple(group_by)
        for alert in alerts:
            _set_key(alert, incident_key(alert, mode=mode, group_by=group_by, tenant=tenant))
        return alerts
    heads: dict[str, bytes] = {}
    sha256 = hashlib.sha256
    for alert in alerts:
        head = heads.get(alert.source)
        if head is None:
            head = heads[alert.source] = _encode((_VERSION, "identity", tenant, alert.source))
        key = sha256(head + _encode((alert.identity,))).hexdigest()[:KEY_CHARS]
        _set_key(alert, key)
    return alerts


def _set_key(alert: Alert, key: str) -> None:
    object.__setattr__(alert, "key", key)  # frozen for everyone after this point


def _encode(parts: Iterable[str]) -> bytes:
    """The length-prefixed encoding ``_digest`` hashes."""
    out = []
    for part in parts:
        raw = part.encode("utf-8", "surrogatepass")
        out.append(b"%d:" % len(raw))
        out.append(raw)
    return b"".join(out)


def _digest(parts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        # surrogatepass: a lone surrogate in a label must still hash, not crash.
        raw = part.encode("utf-8", "surrogatepass")
        digest.update(b"%d:" % len(raw))
        digest.update(raw)
    return digest.hexdigest()[:KEY_CHARS]
