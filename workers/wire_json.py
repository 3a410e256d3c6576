"""kombu's JSON, written and read with orjson.

The same text kombu's ``json`` writes (workers and producers of either kind read each
other's messages), several times faster. What orjson cannot write (integers beyond 64
bits) and what kombu tags with ``__type__`` (dates, UUIDs, bytes) go through kombu.
"""

from __future__ import annotations

from typing import Any

import orjson
from kombu.utils import json as kombu_json


def dumps(obj: Any) -> str:
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return str(kombu_json.dumps(obj))


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    typed = '"__type__"' in data if isinstance(data, str) else b'"__type__"' in bytes(data)
    if typed:
        return kombu_json.loads(data)
    return orjson.loads(data)
