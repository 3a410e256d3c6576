"""Servers of a test's own: a throwaway redis-server on a free port, and the helpers that
start one. For tests that kill, restart or flush a server, which they must never do to
the shared one."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tests.conftest import IN_CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll until condition() is truthy; fail with ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


# ------------------------------------------------------------------ private Redis


class RedisServer:
    """A redis-server of our own: AOF with fsync on every write, so a SIGKILL loses nothing
    that was acknowledged (the broker's contract for an accepted alert)."""

    def __init__(self, workdir: Path, name: str, password: str = "") -> None:
        self.password = password
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        # a restart from a test's background thread may race the fixture's final kill:
        # every process ever started is killed there, not only the current one
        self._started: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            problem = "redis-server is not installed (tests that restart or flush Redis need one)"
            if IN_CI:
                pytest.fail(problem)
            pytest.skip(problem)
        with self._lock:
            proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "yes",
                    "--appendfsync", "always",
                    "--maxmemory-policy", "noeviction",
                    "--dir", str(self.dir),
                    "--logfile", str(self.dir / "redis.log"),
                    *(["--requirepass", self.password] if self.password else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            self._started.append(proc)
        client = redis_lib.Redis(
            port=self.port, password=self.password or None, socket_connect_timeout=0.5
        )
        try:
            wait_for(lambda: self._answers(proc, client), timeout=15, interval=0.05,
                     what="redis-server")  # fmt: skip
        except BaseException:
            self.kill()
            raise
        finally:
            client.close()

    def _answers(self, proc: subprocess.Popen[bytes], client: redis_lib.Redis) -> bool:
        # an exit (the port taken meanwhile, a bad option) fails at once, with the reason;
        # a ping alone could reach another server that took the port
        if proc.poll() is not None:
            log = self.dir / "redis.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise AssertionError(f"redis-server exited with {proc.returncode}: {tail}")
        return _ping(client)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what AOF already holds survives."""
        with self._lock:
            procs, self._started = self._started, []
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def client(self, db: int = 0) -> redis_lib.Redis:
        return redis_lib.Redis(
            port=self.port, db=db, password=self.password or None, socket_timeout=5
        )


def _ping(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.RedisError:
        return False


@contextlib.contextmanager
def redis_servers_running(
    workdir: Path, *names: str, password: str = ""
) -> Iterator[list[RedisServer]]:
    """Started servers, each killed at the end whatever happens to the others."""
    with contextlib.ExitStack() as stack:
        servers = []
        for name in names:
            server = RedisServer(workdir, name, password=password)
            stack.callback(server.kill)
            server.start()
            servers.append(server)
        yield servers
