"""How much faster ``StateStore.decide_many`` could be: measured variants, same Lua logic.

    python bench/decide_variants.py [--redis-url redis://127.0.0.1:6379/6]

current     ``StateStore.decide_many`` as shipped: the pipeline holds a redis-py Script,
            so ``execute()`` first sends SCRIPT EXISTS (a second round trip per message);
no_exists   the same pipeline with plain EVALSHA (load the script once; on NOSCRIPT,
            load and retry): one round trip per message;
one_call    one EVALSHA per message: ``dedup.lua`` wrapped in a Lua function that the
            script calls once per alert, so 100 alerts are one command and one reply.

Every variant decides the same alerts on its own key prefix and the decisions are
compared, so a faster variant is also shown to be an equivalent one. Keys are
written under ``benchproto:*`` and deleted afterwards; nothing is flushed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("BRIDGE_NO_APP", "1")

import redis

from bridge.bench import am_payload, storm_alert
from bridge.dedup import (
    _SCRIPT,
    SNAPSHOT_SOURCES,
    DedupPolicy,
    Outcome,
    StateStore,
    content_digest,
)
from bridge.runtime import Runtime
from bridge.settings import load_settings

WRAPPED = (
    "local function step(KEYS, ARGV)\n"
    + _SCRIPT
    + "\nend\n"
    + """
local per = tonumber(ARGV[1])
local out = {}
for i = 0, (#KEYS / 2) - 1 do
  local keys = {KEYS[2 * i + 1], KEYS[2 * i + 2]}
  local argv = {}
  for j = 1, per do argv[j] = ARGV[1 + i * per + j] end
  out[#out + 1] = step(keys, argv)
end
return out
"""
)


def _args(store: StateStore, alert: Any, token: str) -> list[Any]:
    p = store._policy
    return [
        "decide",
        repr(store._clock()),
        token,
        p.state_ttl_s,
        alert.status.value,
        alert.severity.rank,
        p.update_interval_s,
        p.reopen_window_s,
        p.claim_lease_s,
        p.flap_threshold,
        p.flap_window_s,
        alert.identity if p.group_mode else "",
        content_digest(alert),
        "1" if alert.source in SNAPSHOT_SOURCES else "0",
    ]


def no_exists(client: Any, store: StateStore, sha: str, alerts: list[Any], tokens: list[str]):
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(f"{store._prefix}:stats", "alerts", len(alerts))
    for alert, token in zip(alerts, tokens, strict=True):
        pipe.evalsha(sha, 2, *store._keys(alert.key), *_args(store, alert, token))
    return [Outcome.from_reply(r) for r in pipe.execute()[1:]]


def one_call(client: Any, store: StateStore, sha: str, alerts: list[Any], tokens: list[str]):
    keys: list[str] = []
    argv: list[Any] = [14]
    for alert, token in zip(alerts, tokens, strict=True):
        keys += store._keys(alert.key)
        argv += _args(store, alert, token)
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(f"{store._prefix}:stats", "alerts", len(alerts))
    pipe.evalsha(sha, len(keys), *keys, *argv)
    return [Outcome.from_reply(r) for r in pipe.execute()[1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    settings = load_settings(env={"BRIDGE_REDIS_URL": args.redis_url})

    class Sink:
        def submit(self, action: Any, countdown: float = 0.0) -> None:
            pass

    parse = Runtime(settings, sink=Sink(), redis=client).pipeline.parse
    plain_sha = client.script_load(_SCRIPT)
    wrapped_sha = client.script_load(WRAPPED)
    policy = DedupPolicy.from_settings(settings)
    for batch in (1, 100):
        messages = []
        total = args.keys * args.repeats
        for start in range(0, total, batch):
            payload = am_payload(
                [storm_alert(j % args.keys, "v") for j in range(start, min(total, start + batch))]
            )
            messages.append(parse("alertmanager", payload))
        decisions: dict[str, list[str]] = {}
        for name in ("current", "no_exists", "one_call"):
            prefix = f"benchproto:{name}:{batch}"
            store = StateStore(client, policy, prefix=prefix, clock=time.time)
            seen: list[str] = []
            started = time.perf_counter()
            for i, alerts in enumerate(messages):
                tokens = [f"m{i}:{j}" for j in range(len(alerts))]
                if name == "current":
                    outcomes = store.decide_many(alerts, tokens)
                elif name == "no_exists":
                    outcomes = no_exists(client, store, plain_sha, alerts, tokens)
                else:
                    outcomes = one_call(client, store, wrapped_sha, alerts, tokens)
                seen += [o.decision for o in outcomes]
            seconds = time.perf_counter() - started
            decisions[name] = seen
            print(
                f"batch {batch:>3} {name:<10} {seconds / len(messages) * 1e6:>8,.0f} us/message"
                f" {seconds / total * 1e6:>7,.1f} us/alert {total / seconds:>9,.0f} alerts/s"
            )
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
        same = decisions["current"] == decisions["no_exists"] == decisions["one_call"]
        print(f"  same decisions in every variant: {same}")


if __name__ == "__main__":
    main()
