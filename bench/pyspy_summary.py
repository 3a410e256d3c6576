"""Summarise py-spy raw (collapsed) stacks: where the worker processes spend their time.

    bridge bench --phases per_alert --profile /tmp/prof
    python bench/pyspy_summary.py /tmp/prof/per_alert.txt [--top 30] [--children-only]

Prints inclusive and self shares per function, and a grouping into buckets (Celery
and kombu, broker I/O, Redis state, JSON, parsing and keying, logging, idle).
Idle = samples in a blocking wait (py-spy records them with --idle only, so by
default the shares are of CPU time).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

BUCKETS = (
    ("logging", ("structlog", "logging/", "bridge/logs.py")),
    ("json (de)serialisation", ("json/", "orjson", "kombu/utils/json", "simplejson")),
    ("redis state (decide_many)", ("bridge/dedup.py",)),
    ("redis client", ("redis/",)),
    (
        "parse + key (bridge/sources, keys, alert)",
        ("bridge/sources", "bridge/keys.py", "bridge/alert.py"),
    ),
    ("pipeline glue", ("bridge/pipeline.py", "workers/tasks.py", "bridge/runtime.py")),
    ("ITSM client / HTTP", ("bridge/itsm", "requests/", "urllib3/", "http/client")),
    ("kombu transport", ("kombu/",)),
    ("celery", ("celery/", "billiard/", "vine/")),
)
FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for part in stack.split(";"):
        match = FRAME.match(part.strip())
        if match:
            out.append((match["func"], match["file"]))
        else:
            out.append((part.strip(), ""))
    return out


def _bucket(frames: list[tuple[str, str]]) -> str:
    # innermost frame that belongs to a known bucket decides
    for _func, file in reversed(frames):
        for name, needles in BUCKETS:
            if any(n in file for n in needles):
                return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--children-only",
        action="store_true",
        help="only pool processes (stacks that run a task), not the worker's main process",
    )
    args = parser.parse_args()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in Path(args.path).read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        if args.children_only and "trace_task" not in stack and "fast_trace_task" not in stack:
            continue
        count = int(count_text)
        frames = _frames(stack)
        total += count
        seen = set()
        for func, file in frames:
            name = f"{func} ({file.split('site-packages/')[-1]})"
            if name not in seen:
                inclusive[name] += count
                seen.add(name)
        if frames:
            func, file = frames[-1]
            own[f"{func} ({file.split('site-packages/')[-1]})"] += count
        buckets[_bucket(frames)] += count
    if not total:
        raise SystemExit("no samples")
    print(f"{total} samples\n\nbuckets (innermost known frame):")
    for name, count in buckets.most_common():
        print(f"  {count / total:6.1%}  {name}")
    print("\ninclusive:")
    for name, count in inclusive.most_common(args.top):
        print(f"  {count / total:6.1%}  {name}")
    print("\nself:")
    for name, count in own.most_common(args.top):
        print(f"  {count / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
