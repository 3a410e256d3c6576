"""Shared fixtures: real services in CI (a missing one fails), skips with a reason elsewhere.

Redis tests use database 13 on ``ITSM_BRIDGE_TEST_REDIS_URL`` (default
redis://127.0.0.1:6379/13) and flush it before and after each test. RabbitMQ tests
use the vhost ``bridge-test`` on ``ITSM_BRIDGE_TEST_AMQP_URL``. (Not ``BRIDGE_*``: the
bridge refuses an environment variable of its own prefix that names no setting.)
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# The earlier names: set, they were a URL the tests meant to use instead of the default
# (whose database 13 they flush); now they would be ignored, so stop and say so.
_RENAMED = ("BRIDGE_TEST_REDIS_URL", "BRIDGE_TEST_AMQP_URL", "BRIDGE_BENCH_TEST_REDIS_DBS",
            "BRIDGE_SOAK_TEST_REDIS_DBS")  # fmt: skip
for _old in _RENAMED:
    if _old in os.environ:
        raise pytest.UsageError(
            f"{_old} is now ITSM_{_old}: the bridge refuses unknown BRIDGE_* variables"
        )
REDIS_URL = os.environ.get("ITSM_BRIDGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
AMQP_URL = os.environ.get(
    "ITSM_BRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/bridge-test"
)

# Credentials the simulator accepts; distinctive so leak scans can look for them.
SIM_CLIENT_ID = "bridge-client"
SIM_CLIENT_SECRET = "cl1ent-S3CRET-7f3a"
SIM_USERNAME = "bridge@example.com"
SIM_PASSWORD = "p4ssw0rd-S3CRET-91bc"
SIM_API_KEY = "apikey%40S3CRET%2Fd00d"


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def require_service(url: str, default_port: int, what: str) -> None:
    """Fail in CI when a real service is missing; skip with the reason elsewhere."""
    if _reachable(url, default_port):
        return
    message = f"{what} is not reachable at {url}"
    if IN_CI:
        pytest.fail(message + " (CI must provide it: see .ci/run)")
    pytest.skip(message + "; start it to run this test")


@pytest.fixture
def redis_url() -> Iterator[str]:
    require_service(REDIS_URL, 6379, "Redis")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def redis_client(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def private_redis(tmp_path) -> Iterator[str]:
    """The URL of a redis-server of this test's own, for what must not touch the shared
    one (a flushed script cache is flushed for every client of the server)."""
    from tests.servers import redis_servers_running

    with redis_servers_running(tmp_path, "redis") as (server,):
        yield server.url()


@pytest.fixture
def fake_redis():
    import fakeredis

    return fakeredis.FakeRedis()


@pytest.fixture
def amqp_url() -> str:
    require_service(AMQP_URL, 5672, "RabbitMQ")
    return AMQP_URL


@pytest.fixture
def unique() -> str:
    """A short unique suffix for queue names, key prefixes and the like."""
    return uuid.uuid4().hex[:10]


def _simulator(flavor: str, **kwargs):
    from bridge.itsm.simulator import Simulator

    sim = Simulator(
        flavor=flavor,
        client_id=SIM_CLIENT_ID,
        client_secret=SIM_CLIENT_SECRET,
        username=SIM_USERNAME,
        password=SIM_PASSWORD,
        api_key=SIM_API_KEY,
        **kwargs,
    )
    sim.start()
    return sim


@pytest.fixture(params=["itsm", "serviceops"])
def simulator(request):
    """The ITSM simulator over real HTTP, once per API generation."""
    sim = _simulator(request.param)
    yield sim
    sim.stop()


@pytest.fixture
def itsm_sim():
    """The Gen A ('itsm') simulator only."""
    sim = _simulator("itsm")
    yield sim
    sim.stop()


@pytest.fixture
def serviceops_sim():
    """The Gen B ('serviceops') simulator only."""
    sim = _simulator("serviceops")
    yield sim
    sim.stop()
