"""Fault tests against real processes that the tests own and may kill.

Every test here starts its own Redis servers (broker and state, AOF on) and, for
the RabbitMQ variants, uses one private RabbitMQ node started for the session,
with a vhost per test. The machine's shared Redis and RabbitMQ are never touched:
other suites and benchmarks may be running against them.

``ChaosStack`` runs two or more ``bridge worker --pool prefork`` instances as
subprocesses, can SIGKILL their pool children or whole instances, restart them
with a changed environment, publish alerts, and account for every accepted
alert: an incident tagged with its key in the simulator, or a dead letter.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from bridge import keys as bridge_keys
from bridge import sources
from bridge.dlq import DeadLetterStore
from bridge.itsm.simulator import Simulator
from bridge.pipeline import envelope
from bridge.settings import load_settings
from tests.conftest import IN_CI, SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_USERNAME
from tests.servers import RedisServer, free_port, redis_servers_running, wait_for

ROOT = Path(__file__).resolve().parents[2]
QUEUES = ("bridge.intake", "bridge.urgent", "bridge.updates")
# Figures of the run, written at the end of the session for docs/reliability.md.
SCENARIOS: dict[str, dict[str, Any]] = {}
FIGURES: dict[str, Any] = {
    "kills": 0,
    "broker_restarts": 0,
    "state_restarts": 0,
    "state_flushes": 0,
    "itsm_outages": 0,
    "alerts_accepted": 0,
    "keys": 0,
    "alerts_lost": 0,
    "worker_crashes": 0,
    "duplicates": 0,
    "dead_letters_replayed": 0,
    "secrets_leaked": 0,
    "poison_dead_lettered": 0,
}


@pytest.fixture
def chaos_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bridge-chaos-"))
    yield path
    if os.environ.get("CHAOS_KEEP") != "1":  # keep logs and data to look at a failure
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def redis_servers(chaos_dir: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """(broker, state): two private Redis servers, killed at the end."""
    with redis_servers_running(chaos_dir, "broker", "state") as (broker, state):
        yield broker, state


# ------------------------------------------------------------------ private RabbitMQ


class RabbitNode:
    """A RabbitMQ node of our own (own name, ports, data and log directories)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.name = f"bridgechaos{os.getpid()}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
        )
        shutil.chown(base, "rabbitmq", "rabbitmq")
        for path in base.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": "/var/lib/rabbitmq",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "node.pid"),
        }

    def start(self) -> None:
        out = (self.base / "log" / "stdout.log").open("ab")
        self.proc = subprocess.Popen(
            ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
            env=self.env(),
            cwd=self.base,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user="rabbitmq",
            group="rabbitmq",
        )
        wait_for(self._accepts, timeout=60, interval=0.25, what="the private RabbitMQ node")
        self.ctl("await_startup", timeout=60)

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                "the private RabbitMQ node exited: "
                + (self.base / "log" / "stdout.log").read_text(errors="replace")[-2000:]
            )
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def ctl(self, *args: str, timeout: float = 30) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def kill(self) -> None:
        """SIGKILL the whole node: no clean shutdown."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=15)
        self.proc = None
        # epmd forgets the node once its connection drops; wait for the port to be free
        time.sleep(0.5)

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def add_vhost(self, vhost: str) -> str:
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    def _per_queue(self, vhost: str, column: str) -> dict[str, int]:
        out = self.ctl("list_queues", "-p", vhost, "--no-table-headers", "name", column)
        table = (line.split() for line in out.splitlines())
        return {p[0]: int(p[1]) for p in table if len(p) == 2 and p[1].isdigit()}

    def consumers(self, vhost: str, queue: str) -> int:
        """Consumers of one queue of the vhost; 0 while the queue does not exist yet."""
        return self._per_queue(vhost, "consumers").get(queue, 0)

    def queued(self, vhost: str) -> int:
        """Messages ready or unacked in every queue of the vhost."""
        return sum(self._per_queue(vhost, "messages").values())


@pytest.fixture(scope="session")
def rabbit_node() -> Iterator[RabbitNode]:
    problem = None
    if shutil.which("rabbitmqctl") is None or not Path("/usr/lib/rabbitmq/bin").exists():
        problem = "rabbitmq-server is not installed"
    elif os.geteuid() != 0:
        problem = "a private RabbitMQ node is started as the rabbitmq user, which needs root"
    if problem:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    base = Path(tempfile.mkdtemp(prefix="bridge-chaos-rmq-"))
    node = RabbitNode(base)
    node.start()
    yield node
    with contextlib.suppress(Exception):
        node.ctl("stop", timeout=30)
    node.kill()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def rabbit_vhost(rabbit_node: RabbitNode) -> Iterator[tuple[RabbitNode, str, str]]:
    vhost = f"chaos-{uuid.uuid4().hex[:8]}"
    url = rabbit_node.add_vhost(vhost)
    yield rabbit_node, vhost, url
    with contextlib.suppress(Exception):
        rabbit_node.ctl("delete_vhost", vhost)


# ------------------------------------------------------------------ the simulator


def make_simulator(
    flavor: str,
    *,
    client_secret: str = SIM_CLIENT_SECRET,
    password: str = SIM_PASSWORD,
    port: int = 0,
) -> Simulator:
    sim = Simulator(
        flavor=flavor,
        client_id=SIM_CLIENT_ID,
        client_secret=client_secret,
        username=SIM_USERNAME,
        password=password,
        port=port,
        threads=24,
    )
    sim.start()
    return sim


@pytest.fixture
def sim_factory() -> Iterator[Callable[..., Simulator]]:
    sims: list[Simulator] = []

    def make(flavor: str, **kwargs: Any) -> Simulator:
        sim = make_simulator(flavor, **kwargs)
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        sim.stop()


# ------------------------------------------------------------------ the bridge


def _age_s(pid: int) -> float:
    """Seconds since the process started (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return 0.0
    started = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return uptime - started


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class WorkerInstance:
    """One ``bridge worker`` process: prefork (with pool children) or threads."""

    def __init__(
        self,
        index: int,
        log_path: Path,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: str | None = None,
        prefetch: int | None = None,
    ) -> None:
        self.index = index
        self.log_path = log_path
        self.pool = pool
        self.concurrency = concurrency
        self.queues = queues
        self.prefetch = prefetch
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ready(self) -> bool:
        if self.pool != "prefork":
            return self.alive  # a threads pool has no children to wait for
        return len(self.children()) >= self.concurrency

    def start(self, env: dict[str, str]) -> None:
        log = self.log_path.open("ab")
        options = ["-Q", self.queues] if self.queues else []
        if self.prefetch is not None:
            options += ["--prefetch-multiplier", str(self.prefetch)]
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "bridge.cli", "worker",
                "--pool", self.pool, "--concurrency", str(self.concurrency), *options,
                "--loglevel", "INFO", "-n", f"chaos{self.index}-{uuid.uuid4().hex[:6]}@%h",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        return _children(self.proc.pid) if self.alive and self.proc else []

    def kill_child(self, rng: random.Random) -> bool:
        # a child killed while it is still starting makes billiard give up on the whole
        # pool ("Could not start worker processes"): kill only children at work
        kids = [k for k in self.children() if _age_s(k) >= 1.5]
        if not kids:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(rng.choice(kids), signal.SIGKILL)
        return True

    def kill_all(self) -> None:
        """SIGKILL the main process and its children at once: the node is gone."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class Accounting:
    """Where every accepted alert key ended up."""

    keys: set[str]
    incidents: dict[str, list[dict[str, Any]]]
    dead_letters: list[Any]
    missing: set[str] = field(default_factory=set)

    @property
    def duplicates(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.incidents.items() if len(v) > 1}

    def dead_letter_keys(self) -> set[str]:
        return {e.key for e in self.dead_letters if e.key}


class ChaosStack:
    """Several worker instances on one broker, one state Redis and one simulator."""

    def __init__(
        self,
        *,
        broker_url: str,
        redis_url: str,
        sim: Simulator,
        workdir: Path,
        instances: int = 2,
        concurrency: int = 2,
        act_pool: str | None = None,
        intake_prefetch: int | None = None,
        extra_env: dict[str, str] | None = None,
        client_secret: str = SIM_CLIENT_SECRET,
        password: str = SIM_PASSWORD,
        broker_queued: Callable[[], int] | None = None,
    ) -> None:
        self.sim = sim
        self.workdir = workdir
        self.prefix = f"chaos{uuid.uuid4().hex[:6]}"
        self.concurrency = concurrency
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
            "BRIDGE_BROKER_URL": broker_url,
            "BRIDGE_REDIS_URL": redis_url,
            "BRIDGE_REDIS_PREFIX": self.prefix,
            "BRIDGE_ITSM_URL": sim.url,
            "BRIDGE_ITSM_FLAVOR": sim.flavor,
            "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
            "BRIDGE_ITSM_CLIENT_SECRET": client_secret,
            "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
            "BRIDGE_ITSM_PASSWORD": password,
            "BRIDGE_ITSM_READ_TIMEOUT_S": "3",
            "BRIDGE_ITSM_CONNECT_TIMEOUT_S": "1",
            "BRIDGE_ITSM_BREAKER_OPEN_S": "2",
            "BRIDGE_LOG_FORMAT": "json",
            "BRIDGE_RETRY_BASE_DELAY_S": "0.2",
            "BRIDGE_RETRY_MAX_DELAY_S": "2",
            "BRIDGE_RETRY_MAX_ATTEMPTS": "30",
            # the shortest visibility timeout allowed: a killed instance's messages come back
            # after 60 s; every delay must stay below it
            "BRIDGE_BROKER_VISIBILITY_TIMEOUT_S": "60",
            "BRIDGE_RETRY_AFTER_CAP_S": "30",
            "BRIDGE_DEDUP_FLAP_QUIET_S": "30",
            "BRIDGE_DEDUP_CLAIM_LEASE_S": "20",
            "BRIDGE_DEDUP_LOCK_LEASE_S": "10",
            "BRIDGE_DEDUP_UPDATE_INTERVAL_S": "3600",
            "BRIDGE_WORKER_METRICS_PORT": "0",
            **(extra_env or {}),
        }
        self.settings = load_settings(env=self.env)
        from workers.app import create_app

        self.app = create_app(self.settings)
        self.redis = redis_lib.Redis.from_url(redis_url, socket_timeout=5)
        self.dlq = DeadLetterStore(self.redis, prefix=self.prefix, clock=time.time)
        # act_pool "threads:N": the recommended layout, the prefork instances take only the
        # intake (with intake_prefetch, as deployed) and one more instance runs the ITSM
        # actions on a threads pool
        intake_only = "bridge.intake" if act_pool else None
        self.workers = [
            WorkerInstance(i, workdir / f"worker{i}.log", concurrency=concurrency,
                           queues=intake_only, prefetch=intake_prefetch)
            for i in range(instances)
        ]  # fmt: skip
        if act_pool:
            pool, _, threads = act_pool.partition(":")
            self.workers.append(
                WorkerInstance(instances, workdir / f"worker{instances}.log", pool=pool,
                               concurrency=int(threads), queues="bridge.urgent,bridge.updates")
            )  # fmt: skip
        self.accepted: set[str] = set()
        self.alerts_accepted = 0
        self.kills = 0
        # Worker exits nobody asked for, restarted by the supervisor as systemd or an
        # orchestrator would: (instance, last log lines) each.
        self.crashes: list[tuple[int, str]] = []
        self._lifecycle = threading.Lock()
        self._supervising = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._broker_queued = broker_queued
        self._rng = random.Random(1234)
        self.started_at = time.monotonic()

    # -------------------------------------------------------------- processes

    def start(self) -> None:
        with self._lifecycle:
            for w in self.workers:
                if not w.alive:
                    w.start(self.env)
        wait_for(
            lambda: all(w.ready for w in self.workers),
            timeout=60,
            what="the worker pools",
        )
        self._supervise()

    def _supervise(self) -> None:
        """Restart an instance that exited on its own, like a process supervisor."""
        if self._supervisor is not None and self._supervisor.is_alive():
            self._supervising.set()
            return
        self._supervising.set()

        def loop() -> None:
            while self._supervising.is_set():
                time.sleep(0.5)
                with self._lifecycle:
                    if not self._supervising.is_set():
                        return
                    for w in self.workers:
                        if w.proc is not None and w.proc.poll() is not None:
                            tail = w.log_path.read_text(errors="replace")[-3000:]
                            self.crashes.append((w.index, tail))
                            w.proc = None
                            w.start(self.env)

        self._supervisor = threading.Thread(target=loop, daemon=True)
        self._supervisor.start()

    def stop(self) -> None:
        self._supervising.clear()
        with self._lifecycle:
            for w in self.workers:
                w.stop()

    def restart_with(self, **env: str) -> None:
        """Stop every worker, change their environment (new config), start them again."""
        self.stop()
        self.env.update(env)
        self.start()

    def kill_child(self) -> bool:
        candidates = [w for w in self.workers if w.children()]
        if candidates and self._rng.choice(candidates).kill_child(self._rng):
            self.kills += 1
            return True
        return False

    def kill_instance(self, index: int | None = None) -> None:
        """SIGKILL a whole instance (main process and pool) and start it again."""
        with self._lifecycle:
            alive = [w for w in self.workers if w.alive]
            victim = self.workers[index] if index is not None else self._rng.choice(alive)
            victim.kill_all()
            self.kills += 1
            victim.start(self.env)

    def ensure_running(self) -> None:
        with self._lifecycle:
            for w in self.workers:
                if not w.alive:
                    w.start(self.env)

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(Exception):
            self.app.close()
        self.redis.close()

    # -------------------------------------------------------------- alerts

    def keys_of(self, fmt: str, payload: Any) -> list[str]:
        s = self.settings
        return [
            bridge_keys.with_key(
                a, mode=s.dedup_key_mode, group_by=s.dedup_group_by, tenant=s.dedup_tenant
            ).key
            for a in sources.parse(fmt, payload)
        ]

    def publish(self, fmt: str, payload: Any) -> bool:
        """Offer one message; True when the broker took it (the alert is then accepted)."""
        from workers.app import publish

        try:
            publish(self.app, envelope(fmt, payload), timeout=2)
        except Exception:
            return False
        keys = self.keys_of(fmt, payload)
        self.accepted.update(keys)
        self.alerts_accepted += len(keys)
        return True

    def publish_until_accepted(self, fmt: str, payload: Any, timeout: float = 60) -> None:
        """A sender retrying until the bridge takes its alert (as Alertmanager does)."""
        wait_for(lambda: self.publish(fmt, payload), timeout=timeout, interval=0.5,
                 what="the broker to accept a message")  # fmt: skip

    # -------------------------------------------------------------- accounting

    def incidents_by_key(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for incident in self.sim.incidents():
            for tag in incident.get("tags") or []:
                if tag.startswith("bridge-key:"):
                    found.setdefault(tag.removeprefix("bridge-key:"), []).append(incident)
        return found

    def dead_letters(self) -> list[Any]:
        try:
            return self.dlq.list()
        except redis_lib.RedisError:
            return []

    def account(self) -> Accounting:
        incidents = self.incidents_by_key()
        dead = self.dead_letters()
        dead_keys = {e.key for e in dead if e.key}
        missing = {k for k in self.accepted if k not in incidents and k not in dead_keys}
        return Accounting(set(self.accepted), incidents, dead, missing)

    def broker_queued(self) -> int:
        if self._broker_queued is not None:
            return self._broker_queued()
        broker = redis_lib.Redis.from_url(self.settings.broker_url, socket_timeout=5)
        try:
            total = int(broker.hlen("unacked"))
            for q in QUEUES:
                for name in broker.scan_iter(f"{q}*"):
                    if broker.type(name) == b"list":
                        total += int(broker.llen(name))
            return total
        except redis_lib.RedisError:
            return -1
        finally:
            broker.close()

    def settle(self, timeout: float = 120, quiet_s: float = 3.0) -> Accounting:
        """Wait until every accepted key is accounted for and the bridge has gone quiet."""
        deadline = time.monotonic() + timeout
        last_total, quiet_since = -1, time.monotonic()
        while True:
            acc = self.account()
            total = self.sim.calls().get("total", 0)
            queued = self.broker_queued()
            if total != last_total or queued != 0:
                last_total, quiet_since = total, time.monotonic()
            if not acc.missing and queued == 0 and time.monotonic() - quiet_since >= quiet_s:
                return acc
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not settled after {timeout}s: {len(acc.missing)} keys unaccounted "
                    f"({sorted(acc.missing)[:5]}...), {queued} messages on the broker"
                )
            time.sleep(0.5)

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bridge.cli", *args],
            cwd=ROOT,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def replay_all(self) -> int:
        """``bridge dlq replay --all`` until the store is empty; the number replayed."""
        replayed = 0
        for _ in range(3):
            entries = len(self.dead_letters())
            if not entries:
                break
            done = self.cli("dlq", "replay", "--all")
            replayed += entries
            if done.returncode == 0:
                break
            time.sleep(1)
        return replayed

    def logs(self) -> str:
        return "".join(w.log_path.read_text(errors="replace") for w in self.workers
                       if w.log_path.exists())  # fmt: skip


@pytest.fixture
def stack_factory(chaos_dir: Path) -> Iterator[Callable[..., ChaosStack]]:
    stacks: list[ChaosStack] = []

    def make(**kwargs: Any) -> ChaosStack:
        stack = ChaosStack(workdir=chaos_dir, **kwargs)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


# ------------------------------------------------------------------ alerts


def am_alert(fingerprint: str, status: str = "firing", severity: str = "warning",
             summary: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "status": status,
        "labels": {"alertname": f"Chaos-{fingerprint}", "severity": severity, "job": "node"},
        "annotations": {"summary": summary or f"problem {fingerprint}"},
        "startsAt": "2026-11-28T09:14:05.123Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example.com/graph",
        "fingerprint": fingerprint,
    }


def am_payload(alerts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": '{}:{alertname="chaos"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "itsm-bridge",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example.com",
        "alerts": alerts,
    }


def storm(n_keys: int, repeats: int, batch: int, seed: int, tag: str = "") -> list[dict[str, Any]]:
    """Alertmanager payloads: ``n_keys`` problems each sent ``repeats`` times, shuffled.

    Each repeat carries a new summary, so every delivery is a real occurrence.
    """
    fingerprints = [f"{tag}{seed:04x}{i:08x}" for i in range(n_keys)]
    order = [(fp, r) for fp in fingerprints for r in range(repeats)]
    random.Random(seed).shuffle(order)
    return [
        am_payload([am_alert(fp, summary=f"problem {fp} #{r}") for fp, r in order[i : i + batch]])
        for i in range(0, len(order), batch)
    ]


def record(acc: Accounting, stack: ChaosStack, **figures: int) -> None:
    """Add one scenario's outcome to the run's figures, in total and per scenario."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "unknown").split(" ")[0].split("::")[-1]
    SCENARIOS[test] = {
        "alerts_accepted": stack.alerts_accepted,
        "keys": len(acc.keys),
        "incidents": sum(len(v) for v in acc.incidents.values()),
        "dead_letters_left": len(acc.dead_letters),
        "kills": stack.kills,
        "worker_crashes": len(stack.crashes),
        "duplicates": sum(n - 1 for n in acc.duplicates.values()),
        "alerts_lost": len(acc.missing),
        "seconds": round(time.monotonic() - stack.started_at, 1),
        **figures,
    }
    FIGURES["alerts_accepted"] += stack.alerts_accepted
    FIGURES["keys"] += len(acc.keys)
    FIGURES["kills"] += stack.kills
    FIGURES["worker_crashes"] += len(stack.crashes)
    FIGURES["duplicates"] += sum(n - 1 for n in acc.duplicates.values())
    FIGURES["alerts_lost"] += len(acc.missing)
    for name, value in figures.items():
        FIGURES[name] = FIGURES.get(name, 0) + value


def assert_exactly_one_incident_per_key(stack: ChaosStack) -> Accounting:
    acc = stack.account()
    assert not acc.duplicates, f"keys with more than one incident: {acc.duplicates}"
    without = {k for k in acc.keys if k not in acc.incidents}
    assert not without, f"{len(without)} accepted keys have no incident: {sorted(without)[:5]}"
    return acc


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    out = os.environ.get("CHAOS_FIGURES")
    if out and any(FIGURES.values()):
        report = {"totals": FIGURES, "scenarios": SCENARIOS}
        Path(out).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


__all__ = [
    "FIGURES",
    "Accounting",
    "ChaosStack",
    "RabbitNode",
    "am_alert",
    "am_payload",
    "assert_exactly_one_incident_per_key",
    "record",
    "storm",
]
