"""``bridge bench``: the bridge measured against its own limits, side by side in one run.

Every phase runs against real services: Redis (broker database 5, state database 6,
key prefix ``bench``) or RabbitMQ (vhost ``bridge-bench``) as the broker, prefork
workers in a subprocess (``bridge worker``), the ITSM simulator in a thread of this
process with a fixed latency, and for the latency phase the HTTP ingest
(``bridge serve``) in another subprocess.

Phases, each on flushed databases and freshly started workers:

floor       a queue prefilled with ``bridge.noop`` tasks: messages/s the broker, pool
            and settings allow at one message per alert; then the same no-op task
            carrying a one-alert message and making one Redis round trip (a PING on
            the state store's client): the least any per-alert path that decides
            against shared state in Redis must do;
per_alert   the storm: one alert per message, every key repeated (default 100 times
            over 1,000 keys); alerts/s, the ITSM calls it caused and the footprint
            (Redis bytes per tracked key, worker RSS before and after);
batched     the same key mix in Alertmanager payloads of ``--batch-size`` alerts;
new         every alert a new key: incidents/s against the simulator's latency;
latency     a steady offered load of new keys through the ingest: time from the 202
            to the simulator storing the create.

Throughput is counted from the first message done to the last (the counter
``{prefix}:stats`` field ``alerts``, or the queue length for the no-op task), so
worker start-up is excluded. Every wait is bounded and fails with what it saw.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import orjson

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "bench"
VHOST = "bridge-bench"
BROKER_DB = 5
STATE_DB = 6
RESERVED_DBS = frozenset({11, 12, 13})  # flushed by the test suites
QUEUES = ("bridge.intake", "bridge.urgent", "bridge.updates")
# What docker-compose.yml and docs/runbook.md give the intake workers: room for the
# messages that gather while both pool processes are busy, which then go to the next free
# process as one batch (workers/intake_batch.py; docs/performance.md, "Intake batches").
INTAKE_PREFETCH = 16
PHASES = ("floor", "per_alert", "batched", "new", "latency")
INGEST_TOKEN = "bench-ingest-token-5e1d"
SIM_CLIENT_ID = "bench-client"
SIM_CLIENT_SECRET = "bench-secret-8c2f"
SIM_USERNAME = "bench@example.com"
SIM_PASSWORD = "bench-password-41aa"
POLL_S = 0.01

# Targets of the performance issue (2 cores, real Redis).
TARGET_PER_ALERT_RATIO = 0.8
TARGET_BATCHED_ALERTS_S = 20_000
TARGET_WRITES_PER_ALERT = 0.011  # 100 repeats per key: 1 create per key plus 10% slack
TARGET_LATENCY_P99_OVER_ITSM_MS = 50.0
TARGET_BYTES_PER_KEY = 300
TARGET_RSS_GROWTH = 0.10


class BenchError(Exception):
    """A phase could not complete; the message says what was seen and where to look."""


@dataclass(frozen=True)
class Sizes:
    floor_msgs: int
    storm_keys: int
    storm_repeats: int
    batched_keys: int
    batched_repeats: int
    new_incidents: int
    latency_rate: float
    latency_s: float

    def scaled(self, factor: float) -> Sizes:
        if factor == 1.0:
            return self

        def n(value: int, least: int) -> int:
            return max(least, int(value * factor))

        return replace(
            self,
            floor_msgs=n(self.floor_msgs, 50),
            storm_keys=n(self.storm_keys, 5),
            batched_keys=n(self.batched_keys, 5),
            new_incidents=n(self.new_incidents, 10),
            latency_s=max(0.5, self.latency_s * factor),
        )


FULL = Sizes(20_000, 1_000, 100, 1_000, 100, 2_000, 200.0, 15.0)
QUICK = Sizes(2_000, 100, 20, 100, 100, 200, 200.0, 3.0)


# ------------------------------------------------------------------ options


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bridge bench",
        description="Measure the bridge against its own limits (floor, per-alert, batched, "
        "new incidents, latency, ITSM economy, footprint) in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="reduced sizes, under a minute")
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    parser.add_argument(
        "--workers", type=int, default=2, help="prefork worker processes (default 2)"
    )
    parser.add_argument(
        "--itsm-latency-ms", type=float, default=5.0, help="simulator latency per call"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--batch-size", type=int, default=100, help="alerts per message in the batched phase"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="offered load of the latency phase in alerts/s (default 200)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the phase sizes (e.g. 0.2)"
    )
    parser.add_argument(
        "--flavor", choices=("itsm", "serviceops"), default="itsm", help="simulated ITSM API"
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379",
        help="Redis server; databases --broker-db and --state-db on it are FLUSHED",
    )
    parser.add_argument("--broker-db", type=int, default=BROKER_DB)
    parser.add_argument("--state-db", type=int, default=STATE_DB)
    parser.add_argument(
        "--amqp-url",
        default=f"amqp://guest:guest@127.0.0.1:5672/{VHOST}",
        help="RabbitMQ for --broker rabbitmq; its bridge.* queues are purged",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="record every phase with py-spy (raw stacks of the intake and the action worker) "
        "into DIR; the profiler's own CPU shows in the figures, so the run is marked profiled",
    )
    parser.add_argument(
        "--act-pool",
        metavar="POOL:N",
        default="threads:16",
        help="run ITSM actions (bridge.urgent, bridge.updates) on a second worker with this "
        "pool, the deployment docs/runbook.md recommends; the prefork workers then take only "
        "bridge.intake. 'none': every queue on the prefork workers (default: %(default)s)",
    )
    parser.add_argument(
        "--intake-prefetch",
        type=int,
        default=None,
        metavar="N",
        help=f"prefetch multiplier of the prefork workers (default: {INTAKE_PREFETCH} when they "
        "take only bridge.intake, as docs/runbook.md deploys them; 1 with --act-pool none)",
    )
    parser.add_argument(
        "--intake-batch",
        type=int,
        default=None,
        metavar="N",
        help="intake messages a pool process decides together while all are busy "
        "(worker.intake_batch; default: the setting's, 32; 1 = one at a time)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker/ingest logs")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    args.phases = phases
    if args.act_pool.strip().lower() in {"", "none"}:
        args.act_pool = ""
    if args.act_pool:
        pool, _, count = args.act_pool.partition(":")
        if pool not in {"threads", "prefork", "gevent"} or not count.isdigit() or int(count) < 1:
            parser.error("--act-pool takes POOL:N, e.g. threads:16")
    if args.intake_prefetch is None:
        args.intake_prefetch = INTAKE_PREFETCH if args.act_pool else 1
    if args.intake_prefetch < 1:
        parser.error("--intake-prefetch must be at least 1")
    if args.intake_batch is None:
        from bridge.settings import Settings

        args.intake_batch = Settings.model_fields["worker_intake_batch"].default
    if args.intake_batch < 1:
        parser.error("--intake-batch must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    for db in (args.broker_db, args.state_db):
        if db in RESERVED_DBS:
            parser.error(f"Redis database {db} belongs to the test suites; pick another")
    if args.broker_db == args.state_db:
        parser.error("--broker-db and --state-db must differ")
    return args


# ------------------------------------------------------------------ helpers


def _db_url(base: str, db: int) -> str:
    parsed = urlparse(base)
    return urlunparse(parsed._replace(path=f"/{db}"))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces: the fields after ")" are fixed
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return 0.0
    # after the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(proc: subprocess.Popen[bytes] | None) -> float:
    """CPU time of a worker: its main process and its pool (0 when there is none)."""
    if proc is None:
        return 0.0
    return sum(_cpu_seconds(pid) for pid in (proc.pid, *_children(proc.pid)))


def _tree_rss(pid: int) -> dict[int, int]:
    """RSS of a process and its children (a prefork worker: main process + pool)."""
    pids = [pid, *_children(pid)]
    return {p: _rss_bytes(p) for p in pids}


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _git_dirty() -> bool:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "bridge", "workers"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


def ensure_vhost(vhost: str = VHOST) -> None:
    """Create the benchmark's RabbitMQ vhost (and guest's permissions) when missing."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise BenchError(
            f"--broker rabbitmq needs rabbitmqctl on PATH to create the vhost {vhost!r}; "
            f"create it by hand (rabbitmqctl add_vhost {vhost}; rabbitmqctl set_permissions "
            f"-p {vhost} guest '.*' '.*' '.*') or run on the RabbitMQ host"
        )
    try:
        listed = subprocess.run(
            [ctl, "-q", "list_vhosts"], capture_output=True, text=True, timeout=60, check=True
        )
        if vhost not in listed.stdout.split():
            subprocess.run([ctl, "-q", "add_vhost", vhost], capture_output=True, timeout=60)
        subprocess.run(
            [ctl, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            capture_output=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise BenchError(f"rabbitmqctl could not prepare the vhost {vhost!r}: {detail}") from None


def am_alert(fingerprint: str, summary: str, status: str = "firing") -> dict[str, Any]:
    """One Alertmanager alert shaped like a real node-exporter alert."""
    return {
        "status": status,
        "labels": {
            "alertname": "HighLatency",
            "instance": f"host-{fingerprint[-6:]}:9100",
            "job": "node",
            "severity": "warning",
        },
        "annotations": {"summary": summary},
        "startsAt": "2026-01-01T00:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example/graph?g0.expr=latency",
        "fingerprint": fingerprint,
    }


def am_payload(alerts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": '{}:{alertname="HighLatency"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "itsm-bridge",
        "groupLabels": {"alertname": "HighLatency"},
        "commonLabels": {"alertname": "HighLatency", "job": "node"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example",
        "alerts": alerts,
    }


def storm_alert(key: int, tag: str) -> dict[str, Any]:
    fingerprint = f"{tag}{key:014x}"
    return am_alert(fingerprint, f"p99 latency above 1 s on host {key}")


@dataclass
class Drain:
    """Progress of one drain: items done between the first and the last observation."""

    total: int
    first_done: int
    seconds: float
    cpu_s: float = math.nan  # CPU time of the worker processes over the same span
    redis_cpu_s: float = math.nan  # CPU time of the Redis server over the same span

    @property
    def cpu_us_per_item(self) -> float:
        """Worker CPU per item done (user + system; noise on a shared machine moves it
        far less than wall-clock rates)."""
        done = self.total - self.first_done
        return self.cpu_s / done * 1e6 if done > 0 else math.nan

    @property
    def redis_cpu_us_per_item(self) -> float:
        done = self.total - self.first_done
        return self.redis_cpu_s / done * 1e6 if done > 0 else math.nan

    @property
    def rate(self) -> float:
        done = self.total - self.first_done
        if self.seconds <= 0 or done <= 0:
            return math.nan
        return done / self.seconds


# ------------------------------------------------------------------ the harness


class Harness:
    """Services, workers and the simulator for one benchmark run."""

    def __init__(self, args: argparse.Namespace) -> None:
        os.environ.setdefault("BRIDGE_NO_APP", "1")  # workers.app: no app from this env
        import redis

        from bridge.itsm.simulator import Simulator
        from bridge.settings import load_settings

        self.args = args
        self.state_url = _db_url(args.redis_url, args.state_db)
        self.redis_broker_url = _db_url(args.redis_url, args.broker_db)
        self.broker_url = self.redis_broker_url if args.broker == "redis" else args.amqp_url
        self.workdir = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
        self.log_path = self.workdir / "worker.log"
        self.ingest_log = self.workdir / "ingest.log"
        # typed Any: redis-py's stubs mix sync and async return types
        self.state: Any = redis.Redis.from_url(self.state_url, socket_timeout=10)
        self.broker_redis: Any = redis.Redis.from_url(self.redis_broker_url, socket_timeout=10)
        try:
            self.state.ping()
        except redis.RedisError as exc:
            raise BenchError(f"Redis is not reachable at {args.redis_url}: {exc}") from None
        if args.broker == "rabbitmq":
            ensure_vhost(urlparse(args.amqp_url).path.lstrip("/") or "/")
        self.sim = Simulator(
            args.flavor,
            client_id=SIM_CLIENT_ID,
            client_secret=SIM_CLIENT_SECRET,
            username=SIM_USERNAME,
            password=SIM_PASSWORD,
            api_key="bench-api-key",
            latency_s=args.itsm_latency_ms / 1000.0,
            threads=max(16, 4 * args.workers),
        )
        self.sim.start()
        base = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        self.env = {
            **base,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")])),
            "BRIDGE_BROKER_URL": self.broker_url,
            "BRIDGE_REDIS_URL": self.state_url,
            "BRIDGE_REDIS_PREFIX": PREFIX,
            "BRIDGE_ITSM_URL": self.sim.url,
            "BRIDGE_ITSM_FLAVOR": args.flavor,
            "BRIDGE_ITSM_CLIENT_ID": SIM_CLIENT_ID,
            "BRIDGE_ITSM_CLIENT_SECRET": SIM_CLIENT_SECRET,
            "BRIDGE_ITSM_USERNAME": SIM_USERNAME,
            "BRIDGE_ITSM_PASSWORD": SIM_PASSWORD,
            "BRIDGE_LOG_FORMAT": "json",
            "BRIDGE_LOG_LEVEL": "WARNING",
            "BRIDGE_WORKER_METRICS_PORT": "0",
            "BRIDGE_WORKER_CONCURRENCY": str(args.workers),
        }
        # the soak and the dashboard renderer build their own args: the setting's default
        if getattr(args, "intake_batch", None):
            self.env["BRIDGE_WORKER_INTAKE_BATCH"] = str(args.intake_batch)
        self.settings = load_settings(env=self.env)
        self.app: Any = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.act_proc: subprocess.Popen[bytes] | None = None
        self.ingest: subprocess.Popen[bytes] | None = None
        self.ingest_url = ""
        self.profilers: list[subprocess.Popen[bytes]] = []

    # -------------------------------------------------------------- lifecycle

    def fresh(self) -> None:
        """Workers stopped, both bench databases flushed, queues purged, simulator reset."""
        self.stop_workers()
        self.stop_ingest()
        if self.app is not None:
            self.app.close()
            self.app = None
        self.state.flushdb()
        self.broker_redis.flushdb()
        if self.args.broker == "rabbitmq":
            self._purge_amqp()
        self.sim.reset()
        from workers.app import create_app

        # a new app per phase: the old one remembers queues declared before the flush
        self.app = create_app(self.settings)

    def _purge_amqp(self) -> None:
        from kombu import Connection

        with Connection(self.args.amqp_url, connect_timeout=10) as conn:
            for name in QUEUES:
                channel = conn.channel()
                with contextlib.suppress(Exception):  # not declared yet: nothing to purge
                    channel.queue_purge(name)
                with contextlib.suppress(Exception):
                    channel.close()

    def _worker(self, pool: str, concurrency: int, queues: str | None) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "bridge.cli", "worker", "--pool", pool]
        command += ["--concurrency", str(concurrency), "--loglevel", "WARNING"]
        if pool == "prefork":
            command += ["--prefetch-multiplier", str(self.args.intake_prefetch)]
        if queues:
            command += ["-Q", queues, "-n", f"bench-{pool}@%h"]
        log = self.log_path.open("ab")
        try:
            return subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def start_workers(self) -> None:
        if self.args.act_pool:
            pool, _, count = self.args.act_pool.partition(":")
            self.proc = self._worker("prefork", self.args.workers, QUEUES[0])
            self.act_proc = self._worker(pool, int(count), ",".join(QUEUES[1:]))
        else:
            self.proc = self._worker("prefork", self.args.workers, None)

    def stop_workers(self) -> None:
        self.stop_profiler()
        procs = [p for p in (self.proc, self.act_proc) if p is not None]
        self.proc = self.act_proc = None
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def start_ingest(self) -> None:
        port = _free_port()
        env = {
            **self.env,
            "BRIDGE_HTTP_HOST": "127.0.0.1",
            "BRIDGE_HTTP_PORT": str(port),
            "BRIDGE_INGEST_TOKENS": INGEST_TOKEN,
        }
        log = self.ingest_log.open("ab")
        self.ingest = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.ingest_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if self.ingest.poll() is not None:
                raise BenchError(f"the ingest exited at start; see {self.ingest_log}")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the ingest did not answer /healthz in 30 s; see {self.ingest_log}"
                )
            time.sleep(0.1)

    def stop_ingest(self) -> None:
        proc, self.ingest = self.ingest, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def start_profiler(self, name: str) -> None:
        """py-spy on the intake worker (``NAME.txt``) and the action worker (``NAME.act.txt``)."""
        if not self.args.profile or self.proc is None:
            return
        spy = shutil.which("py-spy")
        if spy is None:
            raise BenchError("--profile needs py-spy (pip install py-spy)")
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        for proc, filename in ((self.proc, f"{name}.txt"), (self.act_proc, f"{name}.act.txt")):
            if proc is None:
                continue
            # appended one by one: a failed start still leaves the earlier ones to stop
            self.profilers.append(
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(proc.pid),
                        "--subprocesses",
                        "--format",
                        "raw",
                        "--rate",
                        "250",
                        "--output",
                        str(out / filename),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def stop_profiler(self) -> None:
        profilers, self.profilers = self.profilers, []
        for proc in profilers:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc in profilers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)

    def close(self) -> None:
        self.stop_workers()
        self.stop_ingest()
        if self.app is not None:
            self.app.close()
        with contextlib.suppress(Exception):
            self.state.flushdb()
            self.broker_redis.flushdb()
        self.sim.stop()
        self.state.close()
        self.broker_redis.close()
        if not self.args.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -------------------------------------------------------------- observation

    def log_tail(self, path: Path | None = None, lines: int = 15) -> str:
        path = path or self.log_path
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join(text)

    def _fail(self, message: str) -> BenchError:
        self.args.keep_logs = True
        tail = self.log_tail()
        return BenchError(f"{message}\nworker log: {self.log_path}" + (f"\n{tail}" if tail else ""))

    def alerts_done(self) -> int:
        raw = self.state.hget(f"{PREFIX}:stats", "alerts")
        return int(raw) if raw else 0

    def queue_depths(self) -> dict[str, int]:
        """Messages not yet taken (plus, on Redis, delivered but not acked)."""
        if self.args.broker == "redis":
            pipe = self.broker_redis.pipeline(transaction=False)
            for name in QUEUES:
                pipe.llen(name)
            pipe.hlen("unacked")
            values = pipe.execute()
            return {**dict(zip(QUEUES, values[:-1], strict=True)), "unacked": values[-1]}
        from kombu import Connection

        depths: dict[str, int] = {}
        with Connection(self.args.amqp_url, connect_timeout=10) as conn:
            for name in QUEUES:
                channel = conn.channel()
                try:
                    depths[name] = int(channel.queue_declare(name, passive=True).message_count)
                except Exception:
                    depths[name] = 0
                with contextlib.suppress(Exception):
                    channel.close()
        return depths

    def worker_rss(self) -> int:
        procs = [p for p in (self.proc, self.act_proc) if p is not None]
        return sum(sum(_tree_rss(p.pid).values()) for p in procs)

    def worker_cpu_s(self) -> float:
        """CPU seconds used so far by the worker processes (main process and pool)."""
        return self.intake_cpu_s() + self.actions_cpu_s()

    def intake_cpu_s(self) -> float:
        """CPU seconds of the worker that takes ``bridge.intake`` (every queue without
        ``--act-pool``)."""
        return _tree_cpu_seconds(self.proc)

    def actions_cpu_s(self) -> float:
        """CPU seconds of the action worker (0 without ``--act-pool``)."""
        return _tree_cpu_seconds(self.act_proc)

    def redis_cpu_s(self) -> float:
        """CPU seconds the Redis server (broker and state) has used so far, every thread."""
        info = self.broker_redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def ingest_cpu_s(self) -> float:
        if self.ingest is None:
            return 0.0
        return sum(_cpu_seconds(q) for q in (self.ingest.pid, *_children(self.ingest.pid)))

    def workers_exited(self) -> bool:
        return any(p is not None and p.poll() is not None for p in (self.proc, self.act_proc))

    def ingest_rss(self) -> int:
        if self.ingest is None:
            return 0
        return sum(_tree_rss(self.ingest.pid).values())

    # -------------------------------------------------------------- publishing

    def publish_all(
        self,
        what: str,
        task: str,
        bodies: Iterable[Any],
        expected: int,
        extra_args: tuple[Any, ...] = (),
    ) -> float:
        """Put every message on the intake queue (workers stopped); returns messages/s."""
        from workers.app import INTAKE_QUEUE, intake_argsrepr

        _note(f"  publishing {expected:,} {what} messages")
        started = time.perf_counter()
        sent = 0
        deadline = time.monotonic() + max(120.0, expected / 300)
        with self.app.producer_or_acquire() as producer:
            for body in bodies:
                # the headers the ingest writes (workers.app.publish), not Celery's
                # repr of the whole payload, which would make every message larger
                self.app.send_task(
                    task,
                    args=[body, *extra_args],
                    argsrepr=intake_argsrepr(body) if body is not None else None,
                    kwargsrepr="{}",
                    queue=INTAKE_QUEUE,
                    producer=producer,
                )
                sent += 1
                if sent % 5000 == 0 and time.monotonic() > deadline:
                    raise BenchError(f"publishing {what}: only {sent:,} of {expected:,} in time")
        elapsed = time.perf_counter() - started
        if sent != expected:
            raise BenchError(f"publishing {what}: generated {sent:,}, expected {expected:,}")
        queued = self.queue_depths().get(INTAKE_QUEUE, 0)
        if queued != expected:
            raise BenchError(
                f"publishing {what}: {queued:,} messages on {INTAKE_QUEUE}, expected {expected:,}"
            )
        return sent / elapsed if elapsed > 0 else math.nan

    # -------------------------------------------------------------- waiting

    def drain(
        self,
        what: str,
        progress: Callable[[], int],
        total: int,
        timeout: float,
        on_progress: Callable[[int], None] | None = None,
    ) -> Drain:
        """Wait until ``progress()`` reaches ``total``; time it from the first item done."""
        start_deadline = time.monotonic() + 90.0
        deadline: float | None = None
        t0: float | None = None
        cpu0 = redis_cpu0 = 0.0
        first = 0
        last = 0
        while True:
            now = time.perf_counter()
            done = progress()
            if t0 is None and done > 0:
                t0, first = now, done
                cpu0, redis_cpu0 = self.worker_cpu_s(), self.redis_cpu_s()
                deadline = time.monotonic() + timeout
            if on_progress is not None and done != last:
                on_progress(done)
            last = done
            if done >= total:
                assert t0 is not None
                cpu = self.worker_cpu_s() - cpu0
                redis_cpu = self.redis_cpu_s() - redis_cpu0
                return Drain(total, first, now - t0, cpu_s=cpu, redis_cpu_s=redis_cpu)
            if self.workers_exited():
                raise self._fail(f"{what}: the workers exited at {done:,}/{total:,}")
            if t0 is None and time.monotonic() > start_deadline:
                raise self._fail(f"{what}: the workers took nothing off the queue in 90 s")
            if deadline is not None and time.monotonic() > deadline:
                raise self._fail(f"{what}: {done:,} of {total:,} after {timeout:.0f} s")
            time.sleep(POLL_S)

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.workers_exited():
                raise self._fail(f"{what}: the workers exited")
            if time.monotonic() > deadline:
                raise self._fail(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    def settle_actions(self, what: str, timeout: float) -> None:
        """Wait until no action is queued and the simulator saw no call for a second."""
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        last = -1
        while True:
            total = self.sim.calls()["total"]
            depths = self.queue_depths()
            if total != last or any(depths.values()):
                last, quiet_since = total, time.monotonic()
            elif time.monotonic() - quiet_since >= 1.0:
                return
            if time.monotonic() > deadline:
                raise self._fail(f"{what}: actions still running after {timeout:.0f} s ({depths})")
            time.sleep(0.05)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ phases


def _taken(h: Harness, n: int) -> Callable[[], int]:
    from workers.app import INTAKE_QUEUE

    def taken() -> int:
        depths = h.queue_depths()
        return n - depths[INTAKE_QUEUE] - depths.get("unacked", 0)

    return taken


def _noop_drain(h: Harness, n: int, name: str, round_trips: int) -> Drain:
    """Drain ``n`` no-op tasks; with ``round_trips`` each carries a one-alert message and
    makes that many PINGs on the state store's client."""
    h.fresh()
    if round_trips:
        _note(f"{name}: {n:,} no-op tasks carrying one alert each, one Redis round trip")
        bodies: Iterable[Any] = itertools.islice(_storm_messages(max(1, n // 100), 100, "f"), n)
        h.publish_all("one-round-trip", "bridge.noop", bodies, n, (round_trips,))
    else:
        _note(f"{name}: {n:,} no-op tasks")
        h.publish_all("no-op", "bridge.noop", (None for _ in range(n)), n)
    h.start_workers()
    h.start_profiler(name)
    drain = h.drain(name, _taken(h, n), n, timeout=max(60.0, n / 100))
    h.stop_workers()
    return drain


# The floors: the no-op task, then the same task with what no per-alert design can avoid
# (the alert's message and one round trip to the state store).
_FLOORS = (("floor", 0), ("floor_rtt", 1))


def _floor_figures(floor: str, drain: Drain) -> dict[str, float]:
    return {
        f"{floor}_msgs_per_s": drain.rate,
        f"{floor}_cpu_us_per_msg": drain.cpu_us_per_item,
        f"{floor}_redis_cpu_us_per_msg": drain.redis_cpu_us_per_item,
    }


def phase_floor(h: Harness, sizes: Sizes, out: dict[str, Any]) -> None:
    out["floor_msgs"] = sizes.floor_msgs
    for floor, round_trips in _FLOORS:
        out.update(_floor_figures(floor, _noop_drain(h, sizes.floor_msgs, floor, round_trips)))


def phase_floor_again(h: Harness, sizes: Sizes, out: dict[str, Any]) -> None:
    """Both floors once more, right after the per-alert path.

    The floors the ratios use are the means of the drains before and after the storm,
    so a machine whose speed drifts during the run moves both sides of a ratio alike;
    every drain is reported (``*_before``, ``*_after``).
    """
    for floor, round_trips in _FLOORS:
        drain = _noop_drain(h, sizes.floor_msgs, f"{floor}_after", round_trips)
        for key, after in _floor_figures(floor, drain).items():
            before = out[key]
            out[f"{key}_before"], out[f"{key}_after"] = before, after
            out[key] = (before + after) / 2


def _storm_messages(keys: int, repeats: int, tag: str) -> Iterator[dict[str, Any]]:
    from bridge.pipeline import envelope

    for _ in range(repeats):
        for key in range(keys):
            yield envelope("alertmanager", am_payload([storm_alert(key, tag)]))


def _batched_messages(
    keys: int, repeats: int, batch: int, tag: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    from bridge.pipeline import envelope

    total = keys * repeats
    for start in range(0, total, batch):
        alerts = [storm_alert(j % keys, tag) for j in range(start, min(total, start + batch))]
        yield len(alerts), envelope("alertmanager", am_payload(alerts))


def _footprint(h: Harness, out: dict[str, Any]) -> None:
    """Redis bytes per tracked key, sampled with MEMORY USAGE."""
    inc_keys = []
    for key in h.state.scan_iter(match=f"{PREFIX}:inc:*", count=1000):
        inc_keys.append(key)
        if len(inc_keys) >= 200:
            break
    tracked = sum(1 for _ in h.state.scan_iter(match=f"{PREFIX}:inc:*", count=1000))
    sizes = [int(h.state.memory_usage(k, samples=0) or 0) for k in inc_keys]
    all_bytes = 0
    all_keys = 0
    for key in h.state.scan_iter(match=f"{PREFIX}:*", count=1000):
        all_bytes += int(h.state.memory_usage(key, samples=0) or 0)
        all_keys += 1
    out["redis_tracked_keys"] = tracked
    out["redis_bytes_per_key"] = sum(sizes) / len(sizes) if sizes else math.nan
    out["redis_bytes_per_key_all"] = all_bytes / tracked if tracked else math.nan
    out["redis_keys_total"] = all_keys


def phase_per_alert(h: Harness, sizes: Sizes, out: dict[str, Any]) -> None:
    keys, repeats = sizes.storm_keys, sizes.storm_repeats
    total = keys * repeats
    _note(f"per_alert: {total:,} alerts, one per message, {repeats} repeats of {keys:,} keys")
    h.fresh()
    out["publish_msgs_per_s"] = h.publish_all(
        "one-alert", "bridge.intake", _storm_messages(keys, repeats, "s"), total
    )
    h.start_workers()
    rss: dict[str, int] = {}
    marks: dict[str, tuple[float, int]] = {}
    warm_at = max(1, total // 20)
    half_at = total // 2

    def watch(done: int) -> None:
        if "before" not in rss and done >= warm_at:
            rss["before"] = h.worker_rss()
        if "half" not in marks and done >= half_at:
            marks["half"] = (time.perf_counter(), done)

    h.start_profiler("per_alert")
    drain = h.drain(
        "per_alert", h.alerts_done, total, timeout=max(60.0, total / 100), on_progress=watch
    )
    finished = time.perf_counter()
    h.stop_profiler()
    h.settle_actions("storm actions", timeout=max(60.0, keys / 20))
    rss["after"] = h.worker_rss()
    calls = h.sim.calls()
    tokens = calls["token_password"] + calls["token_refresh"]
    writes = calls["create"] + calls["update"] + calls["note"] + calls["delete"]
    out["per_alert_alerts"] = total
    out["per_alert_alerts_per_s"] = drain.rate
    out["per_alert_cpu_us_per_alert"] = drain.cpu_us_per_item
    out["per_alert_redis_cpu_us_per_alert"] = drain.redis_cpu_us_per_item
    if "half" in marks and finished > marks["half"][0]:
        # the second half: every incident exists already, only repeats are decided
        out["per_alert_repeats_alerts_per_s"] = (total - marks["half"][1]) / (
            finished - marks["half"][0]
        )
    out["storm_alerts"] = total
    out["storm_keys"] = keys
    out["storm_token_requests"] = tokens
    out["storm_creates"] = calls["create"]
    out["storm_other_writes"] = writes - calls["create"]
    out["storm_writes"] = writes
    out["storm_reads"] = calls["get"] + calls["search"] + calls["note_search"]
    out["storm_writes_per_alert"] = writes / total
    out["storm_naive_requests"] = 2 * total
    out["storm_naive_writes"] = total
    out["storm_dead_letters"] = int(h.state.zcard(f"{PREFIX}:dlq:index"))
    _footprint(h, out)
    before, after = rss.get("before", 0), rss["after"]
    out["worker_rss_before_mb"] = before / 2**20
    out["worker_rss_after_mb"] = after / 2**20
    out["worker_rss_growth_ratio"] = (after - before) / before if before else math.nan
    h.stop_workers()


def phase_batched(h: Harness, sizes: Sizes, out: dict[str, Any]) -> None:
    keys, repeats, batch = sizes.batched_keys, sizes.batched_repeats, h.args.batch_size
    total = keys * repeats
    messages = list(_batched_messages(keys, repeats, batch, "b"))
    _note(f"batched: {total:,} alerts in {len(messages):,} messages of up to {batch}")
    h.fresh()
    h.publish_all("batched", "bridge.intake", (m for _, m in messages), len(messages))
    h.start_workers()
    h.start_profiler("batched")
    drain = h.drain("batched", h.alerts_done, total, timeout=max(60.0, total / 1000))
    h.stop_profiler()
    h.settle_actions("batched actions", timeout=max(60.0, keys / 20))
    calls = h.sim.calls()
    out["batched_alerts"] = total
    out["batch_size"] = batch
    out["batched_alerts_per_s"] = drain.rate
    out["batched_cpu_us_per_alert"] = drain.cpu_us_per_item
    out["batched_redis_cpu_us_per_alert"] = drain.redis_cpu_us_per_item
    # what the machine could do if its CPUs did nothing but this work, perfectly shared
    spent_us = drain.cpu_us_per_item + drain.redis_cpu_us_per_item
    out["batched_cpu_bound_alerts_per_s"] = _cpus() / spent_us * 1e6 if spent_us else math.nan
    out["batched_msgs_per_s"] = drain.rate / batch if batch else math.nan
    out["batched_creates"] = calls["create"]
    h.stop_workers()


def phase_new(h: Harness, sizes: Sizes, out: dict[str, Any]) -> None:
    from bridge.pipeline import envelope

    n, batch = sizes.new_incidents, h.args.batch_size
    _note(f"new: {n:,} new keys in messages of up to {batch}")
    h.fresh()
    messages = [
        envelope(
            "alertmanager",
            am_payload([storm_alert(k, "n") for k in range(start, min(n, start + batch))]),
        )
        for start in range(0, n, batch)
    ]
    h.publish_all("new-key", "bridge.intake", messages, len(messages))
    h.start_workers()
    h.start_profiler("new")
    drain = h.drain("new incidents", lambda: h.sim.calls()["create"], n, timeout=max(60.0, n / 20))
    h.stop_profiler()
    h.settle_actions("new incidents", timeout=60.0)
    calls = h.sim.calls()
    out["new_incidents"] = n
    out["new_incidents_per_s"] = drain.rate
    out["new_incidents_creates"] = calls["create"]
    latency_s = h.args.itsm_latency_ms / 1000
    concurrency = int(h.args.act_pool.partition(":")[2]) if h.args.act_pool else h.args.workers
    out["new_incidents_bound_per_s"] = concurrency / latency_s if latency_s else math.nan
    h.stop_workers()


_PROBE = re.compile(r"latency probe (\d+)\b")


def _post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request(
        "POST",
        "/api/v1/alerts/alertmanager",
        body=body,
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {INGEST_TOKEN}",
        },
    )
    response = conn.getresponse()
    response.read()
    return response.status


def _probe_body(i: int) -> bytes:
    return orjson.dumps(am_payload([am_alert(f"l{i:015x}", f"bench latency probe {i}")]))


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class _LatencyCpu:
    """CPU seconds of every process on the path of a new alert, read together."""

    intake: float
    actions: float
    ingest: float
    redis: float
    simulator_and_load: float  # this process: the simulator's and the load generator's threads

    @classmethod
    def now(cls, h: Harness) -> _LatencyCpu:
        return cls(
            h.intake_cpu_s(),
            h.actions_cpu_s(),
            h.ingest_cpu_s(),
            h.redis_cpu_s(),
            time.process_time(),
        )

    def minus(self, earlier: _LatencyCpu) -> _LatencyCpu:
        return _LatencyCpu(
            *(now - then for now, then in zip(astuple(self), astuple(earlier), strict=True))
        )

    def parts(self) -> dict[str, float]:
        return dict(vars(self))


def phase_latency(h: Harness, sizes: Sizes, out: dict[str, Any]) -> None:
    rate, seconds = sizes.latency_rate, sizes.latency_s
    n = int(rate * seconds)
    _note(f"latency: {n:,} new keys at {rate:.0f} alerts/s through the ingest")
    h.fresh()
    h.start_workers()
    h.start_ingest()
    port = int(h.ingest_url.rsplit(":", 1)[1])
    warm = 20
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i in range(warm):
        status = _post(conn, orjson.dumps(am_payload([am_alert(f"w{i:015x}", f"warm-up {i}")])))
        if status != 202:
            raise h._fail(f"latency warm-up: the ingest answered {status}")
    conn.close()
    h.wait_for("the warm-up creates", lambda: h.sim.calls()["create"] >= warm, 90.0)
    h.settle_actions("warm-up", timeout=30.0)
    ingest_before = h.ingest_rss()

    threads = 4
    accepted: dict[int, float] = {}
    answers: list[float] = []
    refused: list[int] = []
    lock = threading.Lock()
    bodies = [_probe_body(i) for i in range(n)]
    cpu0 = _LatencyCpu.now(h)
    h.start_profiler("latency")
    start = time.perf_counter() + 0.2

    def client(index: int) -> None:
        local = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(index, n, threads):
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            sent = time.perf_counter()
            try:
                status = _post(local, bodies[i])
            except OSError:
                status = 0
                local.close()
                local = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            wall = time.time()
            with lock:
                answers.append(time.perf_counter() - sent)
                if status == 202:
                    accepted[i] = wall
                else:
                    refused.append(status)
        local.close()

    workers = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=seconds + 60)
    offered_s = time.perf_counter() - start
    if any(w.is_alive() for w in workers):
        raise h._fail("latency: the load generator did not finish")
    expected = warm + len(accepted)
    h.wait_for(
        f"{len(accepted):,} latency creates",
        lambda: h.sim.calls()["create"] >= expected,
        timeout=max(60.0, seconds * 4),
    )
    cpu = _LatencyCpu.now(h).minus(cpu0)
    h.stop_profiler()
    ingest_after = h.ingest_rss()
    # The simulator stamps createdTime with time.time() in ms, in this process, after its
    # latency: the same clock as the 202 stamps above (1 ms resolution).
    latencies = []
    for record in h.sim.incidents():
        match = _PROBE.search(str(record.get("subject", "")))
        if match is None:
            continue
        i = int(match.group(1))
        if i in accepted:
            latencies.append(float(record["createdTime"]) - accepted[i] * 1000.0)
    out["latency_offered_per_s"] = rate
    out["latency_achieved_per_s"] = n / offered_s if offered_s > 0 else math.nan
    out["latency_alerts"] = n
    out["latency_refused"] = len(refused)
    out["latency_measured"] = len(latencies)
    out["latency_p50_ms"] = _percentile(latencies, 0.50)
    out["latency_p99_ms"] = _percentile(latencies, 0.99)
    out["latency_max_ms"] = max(latencies) if latencies else math.nan
    if accepted:
        per = {part: seconds * 1000 / len(accepted) for part, seconds in cpu.parts().items()}
        out["latency_cpu_ms_per_incident"] = per
        total_ms = sum(per.values())
        out["latency_cpu_bound_per_s"] = _cpus() / total_ms * 1000 if total_ms else math.nan
    out["ingest_response_p50_ms"] = _percentile(answers, 0.50) * 1000
    out["ingest_response_p99_ms"] = _percentile(answers, 0.99) * 1000
    out["ingest_rss_before_mb"] = ingest_before / 2**20
    out["ingest_rss_after_mb"] = ingest_after / 2**20
    out["ingest_rss_growth_ratio"] = (
        (ingest_after - ingest_before) / ingest_before if ingest_before else math.nan
    )
    h.stop_ingest()
    h.stop_workers()


RUNNERS: dict[str, Callable[[Harness, Sizes, dict[str, Any]], None]] = {
    "floor": phase_floor,
    "per_alert": phase_per_alert,
    "batched": phase_batched,
    "new": phase_new,
    "latency": phase_latency,
}


# ------------------------------------------------------------------ report


def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"
    return f"{text} {unit}".rstrip()


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "MISSED")


_CPU_PART = {"redis": "Redis", "simulator_and_load": "sim+load"}


def _drains(out: dict[str, Any], floor: str) -> list[tuple[str, str, str, str]]:
    """The two drains of a floor bracketing the storm, when there were two."""
    if f"{floor}_msgs_per_s_after" not in out:
        return []
    return [
        (
            "    drained before / after the per-alert path",
            f"{_fmt(out[f'{floor}_msgs_per_s_before'])} / "
            f"{_fmt(out[f'{floor}_msgs_per_s_after'], 'msgs/s')}",
            "the figure above is their mean",
            "",
        )
    ]


def rows(out: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, verdict) for the table."""
    table: list[tuple[str, str, str, str]] = []
    floor = out.get("floor_msgs_per_s")
    if floor is not None:
        table.append(("floor: no-op task", _fmt(floor, "msgs/s"), "", ""))
        table += _drains(out, "floor")
    floor_rtt = out.get("floor_rtt_msgs_per_s")
    if floor_rtt is not None:
        out["floor_rtt_floor_ratio"] = floor_rtt / floor if floor else math.nan
        table.append(
            (
                "  no-op + one alert + one Redis round trip",
                f"{_fmt(floor_rtt, 'msgs/s')} = {_fmt(out['floor_rtt_floor_ratio'], 'x floor', 2)}",
                "what no per-alert design avoids",
                "",
            )
        )
        table += _drains(out, "floor_rtt")
    if "per_alert_alerts_per_s" in out:
        rate = out["per_alert_alerts_per_s"]
        ratio = rate / floor if floor else math.nan
        out["per_alert_floor_ratio"] = ratio
        ok = None if math.isnan(ratio) else ratio >= TARGET_PER_ALERT_RATIO
        table.append(
            (
                "per-alert path (incl. creates)",
                f"{_fmt(rate, 'alerts/s')} = {_fmt(ratio, 'x floor', 2)}",
                f">= {TARGET_PER_ALERT_RATIO} x floor",
                _verdict(ok),
            )
        )
        if floor_rtt is not None:
            r = rate / floor_rtt if floor_rtt else math.nan
            out["per_alert_floor_rtt_ratio"] = r
            # what the bridge's own per-alert work costs, beyond what no design avoids
            table.append(("  against the one-round-trip floor", f"{_fmt(r, 'x', 2)}", "", ""))
        floor_cpu = out.get("floor_cpu_us_per_msg", math.nan) + out.get(
            "floor_redis_cpu_us_per_msg", math.nan
        )
        rtt_cpu = out.get("floor_rtt_cpu_us_per_msg", math.nan) + out.get(
            "floor_rtt_redis_cpu_us_per_msg", math.nan
        )
        alert_cpu = out["per_alert_cpu_us_per_alert"] + out.get(
            "per_alert_redis_cpu_us_per_alert", math.nan
        )
        if not math.isnan(floor_cpu + alert_cpu):
            # both CPU-bound on the same cores: the ratio their CPU costs allow
            out["per_alert_cpu_ratio"] = floor_cpu / alert_cpu
            if not math.isnan(rtt_cpu):
                out["floor_rtt_cpu_ratio"] = floor_cpu / rtt_cpu
            table.append(
                (
                    "  CPU per item, worker + Redis: floor / +trip / alert",
                    f"{_fmt(floor_cpu)} / {_fmt(rtt_cpu)} / {_fmt(alert_cpu, 'us')}",
                    f"ratios the CPU allows: {_fmt(out.get('floor_rtt_cpu_ratio'), digits=2)}"
                    f" / {_fmt(out['per_alert_cpu_ratio'], digits=2)}",
                    "",
                )
            )
        repeats = out.get("per_alert_repeats_alerts_per_s")
        if repeats is not None:
            r2 = repeats / floor if floor else math.nan
            out["per_alert_repeats_floor_ratio"] = r2
            table.append(
                (
                    "  second half (repeats only)",
                    f"{_fmt(repeats, 'alerts/s')} = {_fmt(r2, 'x floor', 2)}",
                    "",
                    "",
                )
            )
    if "batched_alerts_per_s" in out:
        rate = out["batched_alerts_per_s"]
        ratio = rate / floor if floor else math.nan
        out["batched_floor_ratio"] = ratio
        table.append(
            (
                f"batched path ({out['batch_size']}/msg)",
                f"{_fmt(rate, 'alerts/s')} = {_fmt(ratio, 'x floor', 1)}",
                f">= {TARGET_BATCHED_ALERTS_S:,} alerts/s",
                _verdict(rate >= TARGET_BATCHED_ALERTS_S),
            )
        )
        bound = out.get("batched_cpu_bound_alerts_per_s")
        if bound is not None:
            table.append(
                (
                    "  CPU per alert: worker / Redis",
                    f"{_fmt(out['batched_cpu_us_per_alert'])} / "
                    f"{_fmt(out['batched_redis_cpu_us_per_alert'], 'us')}",
                    f"{out['cpus']} CPUs: at most {_fmt(bound, 'alerts/s')}",
                    "",
                )
            )
    cpu = [
        (name, out[field])
        for name, field in (
            ("floor", "floor_cpu_us_per_msg"),
            ("per-alert", "per_alert_cpu_us_per_alert"),
            ("batched", "batched_cpu_us_per_alert"),
        )
        if field in out
    ]
    if cpu:
        table.append(
            (
                "worker CPU per item: " + " / ".join(name for name, _ in cpu),
                " / ".join(_fmt(value) for _, value in cpu) + " us",
                "",
                "",
            )
        )
    if "new_incidents_per_s" in out:
        rate, bound = out["new_incidents_per_s"], out["new_incidents_bound_per_s"]
        table.append(
            (
                "new incidents",
                f"{_fmt(rate, 'incidents/s')} = {_fmt(rate / bound, 'x bound', 2)}",
                f"bound {_fmt(bound)}/s = ITSM concurrency / latency",
                "",
            )
        )
    if "latency_p99_ms" in out:
        itsm = out["itsm_latency_ms"]
        p99 = out["latency_p99_ms"]
        table.append(
            (
                f"latency @ {out['latency_offered_per_s']:.0f}/s: p50 / p99 / max",
                f"{_fmt(out['latency_p50_ms'], digits=1)} / {_fmt(p99, digits=1)} / "
                f"{_fmt(out['latency_max_ms'], 'ms', 1)}",
                f"p99 <= {itsm + TARGET_LATENCY_P99_OVER_ITSM_MS:.0f} ms",
                _verdict(not math.isnan(p99) and p99 <= itsm + TARGET_LATENCY_P99_OVER_ITSM_MS),
            )
        )
        per = out.get("latency_cpu_ms_per_incident")
        if per:
            table.append(
                (
                    "  CPU per new alert: " + " / ".join(_CPU_PART.get(k, k) for k in per),
                    " / ".join(_fmt(v, digits=2) for v in per.values())
                    + f" = {_fmt(sum(per.values()), 'ms', 2)}",
                    f"{out['cpus']} CPUs: at most {_fmt(out['latency_cpu_bound_per_s'])}/s",
                    "",
                )
            )
        table.append(
            (
                "  ingest response p50 / p99",
                f"{_fmt(out['ingest_response_p50_ms'], digits=1)} / "
                f"{_fmt(out['ingest_response_p99_ms'], 'ms', 1)}",
                "",
                "",
            )
        )
    if "storm_alerts" in out:
        keys = out["storm_keys"]
        table.append(
            (
                f"storm {out['storm_alerts']:,} alerts / {keys:,} keys: creates",
                _fmt(out["storm_creates"]),
                f"exactly {keys:,}",
                _verdict(out["storm_creates"] == keys),
            )
        )
        table.append(
            (
                "  token requests",
                _fmt(out["storm_token_requests"]),
                "1",
                _verdict(out["storm_token_requests"] == 1),
            )
        )
        table.append(
            (
                "  other writes / reads",
                f"{out['storm_other_writes']} / {out['storm_reads']}",
                "",
                "",
            )
        )
        wpa = out["storm_writes_per_alert"]
        # the 0.011 is for 100 repeats per key; a smaller mix scales it
        limit = TARGET_WRITES_PER_ALERT * 100 * keys / out["storm_alerts"]
        table.append(
            (
                "  writes per alert",
                f"{wpa:.4f} (naive: 1 token + 1 create per alert)",
                f"<= {limit:.4g}",
                _verdict(wpa <= limit),
            )
        )
    if "redis_bytes_per_key" in out:
        b = out["redis_bytes_per_key"]
        table.append(
            (
                "Redis bytes per tracked key",
                f"{_fmt(b, digits=0)} (all bench keys: {_fmt(out['redis_bytes_per_key_all'])})",
                f"<= {TARGET_BYTES_PER_KEY}",
                _verdict(b <= TARGET_BYTES_PER_KEY),
            )
        )
    if "worker_rss_growth_ratio" in out:
        g = out["worker_rss_growth_ratio"]
        table.append(
            (
                "worker RSS over the storm",
                f"{out['worker_rss_before_mb']:.1f} -> {out['worker_rss_after_mb']:.1f} MB "
                f"({g:+.1%})",
                f"<= +{TARGET_RSS_GROWTH:.0%}",
                _verdict(g <= TARGET_RSS_GROWTH),
            )
        )
    if "ingest_rss_growth_ratio" in out:
        g = out["ingest_rss_growth_ratio"]
        table.append(
            (
                "ingest RSS over the latency run",
                f"{out['ingest_rss_before_mb']:.1f} -> {out['ingest_rss_after_mb']:.1f} MB "
                f"({g:+.1%})",
                f"<= +{TARGET_RSS_GROWTH:.0%}",
                _verdict(g <= TARGET_RSS_GROWTH),
            )
        )
    return table


def _scaled(out: dict[str, Any]) -> str:
    scale = out.get("scale", 1.0)
    return "" if scale == 1.0 else f" x {scale:g}"


def render(out: dict[str, Any]) -> str:
    head = (
        f"bridge bench: broker {out['broker']}, {out['workers']} prefork worker processes, "
        f"prefetch {out['prefetch_multiplier']}, "
        f"intake batches of up to {out.get('intake_batch', 1)}, "
        f"{'actions on ' + out['act_pool'] + ', ' if out['act_pool'] else ''}"
        f"ITSM {out['itsm_flavor']} at {out['itsm_latency_ms']:g} ms, "
        f"{'quick' if out['quick'] else 'full'} sizes{_scaled(out)}, commit {out['git_commit']}"
        f"{' (modified)' if out['git_dirty'] else ''}, {out['cpus']} CPUs"
        f"{', PROFILED (py-spy attached)' if out.get('profiled') else ''}"
    )
    table = rows(out)
    widths = [max(len(r[i]) for r in [("figure", "value", "target", ""), *table]) for i in range(4)]
    lines = [head, ""]
    for r in [("figure", "value", "target", ""), *table]:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sizes = (QUICK if args.quick else FULL).scaled(args.scale)
    if args.latency_rate:
        sizes = replace(sizes, latency_rate=args.latency_rate)
    out: dict[str, Any] = {
        "broker": args.broker,
        "workers": args.workers,
        "itsm_latency_ms": args.itsm_latency_ms,
        "itsm_flavor": args.flavor,
        "act_pool": args.act_pool or "",
        "prefetch_multiplier": args.intake_prefetch,
        "intake_batch": args.intake_batch,
        "quick": args.quick,
        "scale": args.scale,
        "phases": args.phases,
        "git_commit": git_commit(),
        "git_dirty": _git_dirty(),
        "cpus": _cpus(),
        "python": sys.version.split()[0],
        "profiled": bool(args.profile),
    }
    started = time.perf_counter()
    try:
        harness = Harness(args)
    except BenchError as exc:
        print(f"bridge bench: {exc}", file=sys.stderr)
        return 2
    try:
        for name in PHASES:
            if name in args.phases:
                RUNNERS[name](harness, sizes, out)
                if name == "per_alert" and "floor" in args.phases:
                    phase_floor_again(harness, sizes, out)
    except BenchError as exc:
        print(f"bridge bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bridge bench: interrupted", file=sys.stderr)
        return 130
    finally:
        harness.close()
    out["duration_s"] = time.perf_counter() - started
    print(render(out))
    if args.json:
        data = {k: _clean(v) for k, v in out.items()}
        Path(args.json).write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
