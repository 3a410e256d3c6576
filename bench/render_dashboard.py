"""Draw ``dashboards/bridge.json`` from a real run, without a Grafana server.

Every panel's own PromQL targets are evaluated by a real Prometheus (``query_range``
over the run's window, Grafana variables substituted) and drawn with matplotlib in
the dashboard's ``gridPos`` layout: time series with their ``legendFormat`` legends,
stat panels as big numbers coloured by their thresholds.

End to end (Prometheus, ITSM simulator, ``bridge serve`` and a prefork worker as real
processes; Redis database 14 is flushed before and after)::

    python -m bench.render_dashboard --run-minutes 4 --out docs/dashboard.png

The run drives a storm of repeats, new problems from three sources, resolutions and
relapses, rejected requests, duplicate incidents made behind the bridge's back (a key
anomaly), short token lifetimes (refresh grants), an ITSM that answers 503 and 400,
hangs, then is down altogether (retries, the circuit breaker, dead letters), comes
back, and ``bridge dlq replay --all``.

Only rendering, against a Prometheus that already holds the data::

    python -m bench.render_dashboard --prometheus http://127.0.0.1:9090 \\
        --start 1764400000 --end 1764400240 --out docs/dashboard.png

``--save-data``/``--from-data`` keep the query results as JSON to redraw without
querying. Needs matplotlib (``pip install -e '.[docs]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "bridge.json"
REDIS_DB = 14
PREFIX = "dashpic"
SCRAPE_S = 2
RATE_INTERVAL = "30s"

# Grafana's dark theme.
BG = "#111217"
PANEL_BG = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
MUTED = "#8e8e9e"
GRID = "#24292e"
PALETTE = [  # Grafana's classic palette, without the shades too dark on a dark panel
    "#7eb26d",
    "#eab839",
    "#6ed0e0",
    "#ef843c",
    "#e24d42",
    "#1f78c1",
    "#ba43a6",
    "#705da0",
    "#508642",
    "#cca300",
    "#447ebc",
    "#c15c17",
    "#b7dbab",
    "#f4d598",
    "#70dbed",
    "#f9ba8f",
    "#f29191",
    "#82b5d8",
    "#e5a8e2",
    "#aea2e0",
]
NAMED = {
    "green": "#73bf69",
    "red": "#f2495c",
    "yellow": "#fade2a",
    "orange": "#ff9830",
    "blue": "#5794f2",
    "purple": "#b877d9",
    "dark-green": "#37872d",
    "dark-red": "#c4162a",
}


# ------------------------------------------------------------------ queries


def substitute(expr: str, variables: dict[str, str]) -> str:
    """``expr`` with Grafana's ``$name`` / ``${name}`` / ``[[name]]`` variables replaced."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in variables:
            raise KeyError(f"no value for the Grafana variable ${name} in {expr!r}")
        return variables[name]

    pattern = r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)"
    return re.sub(pattern, value, expr)


def dashboard_variables(dashboard: dict[str, Any], start: float, end: float) -> dict[str, str]:
    """Values for the built-in variables and the dashboard's templating (All)."""
    span = max(1, round(end - start))
    variables = {
        "__rate_interval": RATE_INTERVAL,
        "__interval": RATE_INTERVAL,
        "__range": f"{span}s",
        "__range_s": str(span),
        "datasource": "prometheus",
    }
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            variables[var["name"]] = var.get("allValue") or ".*"
    return variables


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{params}", timeout=60) as reply:
        answer = json.load(reply)
    if answer.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {answer}")
    return answer["data"]["result"]


def legend(fmt: str | None, metric: dict[str, str], expr: str) -> str:
    if fmt and fmt != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt).strip()
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return "{" + labels + "}" if labels else expr


def collect(
    dashboard: dict[str, Any], prom: str, start: float, end: float, step: float
) -> dict[str, Any]:
    """Every panel's targets evaluated over [start, end]: {panel id: [series, ...]}."""
    variables = dashboard_variables(dashboard, start, end)
    data: dict[str, Any] = {"start": start, "end": end, "step": step, "panels": {}}
    for panel in panels_of(dashboard):
        series = []
        for target in panel.get("targets", []):
            if target.get("hide"):
                continue
            expr = substitute(target["expr"], variables)
            for result in query_range(prom, expr, start, end, step):
                points = [(float(t), float(v)) for t, v in result["values"]]
                name = legend(target.get("legendFormat"), result["metric"], expr)
                series.append({"name": name, "points": points})
        data["panels"][str(panel["id"])] = series
    return data


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels with queries, including those inside collapsed rows."""
    found = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


# ------------------------------------------------------------------ drawing


def fmt_value(value: float, unit: str | None) -> str:
    if value is None or math.isnan(value):
        return "No data"
    if unit == "percentunit":
        if value == 0:
            return "0%"
        return f"{value * 100:.1f}%" if value < 0.1 else f"{value * 100:.0f}%"
    if unit == "s":
        if value == 0:
            return "0 s"
        if value < 1e-3:
            return f"{value * 1e6:.0f} µs"
        if value < 1:
            return f"{value * 1e3:.1f} ms" if value < 0.01 else f"{value * 1e3:.0f} ms"
        return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"
    suffix = " req/s" if unit == "reqps" else ""
    if abs(value) >= 1e6:
        text = f"{value / 1e6:.2f} M"
    elif abs(value) >= 1e4:
        text = f"{value / 1e3:.1f} K"
    elif value == int(value):
        text = f"{int(value)}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}".rstrip("0").rstrip(".")
    elif abs(value) >= 1:
        text = f"{value:.2f}".rstrip("0").rstrip(".")
    else:
        text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text + suffix


def _axis_formatter(unit: str | None) -> Callable[[float, Any], str]:
    def tick(value: float, _pos: Any) -> str:
        if unit == "reqps":
            return fmt_value(value, None) + "/s" if value else "0"
        return fmt_value(value, unit)

    return tick


def _last(points: list[tuple[float, float]]) -> float:
    for _, v in reversed(points):
        if not math.isnan(v):
            return v
    return math.nan


def _reduce(calc: str, points: list[tuple[float, float]]) -> float:
    values = [v for _, v in points if not math.isnan(v)]
    if not values:
        return math.nan
    return {
        "lastNotNull": values[-1],
        "last": values[-1],
        "max": max(values),
        "min": min(values),
        "mean": sum(values) / len(values),
        "sum": sum(values),
        "firstNotNull": values[0],
    }.get(calc, values[-1])


def _threshold_color(panel: dict[str, Any], value: float) -> str:
    steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps")
    color = "green"
    for step in steps or []:
        if step.get("value") is None or (not math.isnan(value) and value >= step["value"]):
            color = step.get("color", color)
    return NAMED.get(color, color)


@dataclass
class Layout:
    width_in: float = 19.2
    unit_h_in: float = 0.34
    gap_in: float = 0.06
    top_in: float = 0.55
    rows: int = 0
    dpi: int = 100
    boxes: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)

    @property
    def height_in(self) -> float:
        return self.top_in + self.rows * self.unit_h_in + 0.1

    def box(self, grid: dict[str, int]) -> tuple[float, float, float, float]:
        """Figure-relative (left, bottom, width, height) of a gridPos."""
        col = self.width_in / 24
        left = grid["x"] * col + self.gap_in
        width = grid["w"] * col - 2 * self.gap_in
        top = self.top_in + grid["y"] * self.unit_h_in + self.gap_in
        height = grid["h"] * self.unit_h_in - 2 * self.gap_in
        h = self.height_in
        return (
            left / self.width_in,
            1 - (top + height) / h,
            width / self.width_in,
            height / h,
        )


def render(dashboard: dict[str, Any], data: dict[str, Any], out: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 8})
    layout = Layout()
    layout.rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = plt.figure(figsize=(layout.width_in, layout.height_in), dpi=layout.dpi, facecolor=BG)
    fig.text(
        0.006,
        1 - 0.2 / layout.height_in,
        dashboard.get("title", ""),
        color=TEXT,
        fontsize=14,
        weight="bold",
        va="center",
    )
    fig.text(
        0.994,
        1 - 0.2 / layout.height_in,
        subtitle,
        color=MUTED,
        fontsize=8.5,
        va="center",
        ha="right",
    )
    start, end = data["start"], data["end"]
    t0 = mdates.date2num(_utc(start))
    t1 = mdates.date2num(_utc(end))

    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        left, bottom, width, height = layout.box(grid)
        if panel["type"] == "row":
            fig.text(
                left + 0.002,
                bottom + height / 2,
                panel.get("title", ""),
                color=TEXT,
                fontsize=11,
                weight="bold",
                va="center",
            )
            continue
        series = data["panels"].get(str(panel["id"]), [])
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if panel["type"] == "stat":
            calc = (panel.get("options", {}).get("reduceOptions", {}).get("calcs") or ["last"])[0]
            value = _reduce(calc, series[0]["points"]) if series else math.nan
            color = _threshold_color(panel, value)
            if math.isnan(value):
                color = PANEL_BG
            fig.patches.append(
                FancyBboxPatch(
                    (left, bottom),
                    width,
                    height,
                    boxstyle="round,pad=0,rounding_size=0.003",
                    transform=fig.transFigure,
                    facecolor=color,
                    edgecolor=BORDER,
                    alpha=0.85,
                    zorder=-10,
                )
            )
            title_color = "#ffffff" if not math.isnan(value) else TEXT
            fig.text(
                left + width / 2,
                bottom + height * 0.85,
                panel["title"],
                color=title_color,
                fontsize=9.5,
                ha="center",
                va="center",
                weight="bold",
            )
            fig.text(
                left + width / 2,
                bottom + height * 0.4,
                fmt_value(value, unit),
                color=title_color if not math.isnan(value) else MUTED,
                fontsize=30 if not math.isnan(value) else 16,
                ha="center",
                va="center",
                weight="bold",
            )
            continue

        fig.patches.append(
            FancyBboxPatch(
                (left, bottom),
                width,
                height,
                boxstyle="round,pad=0,rounding_size=0.003",
                transform=fig.transFigure,
                facecolor=PANEL_BG,
                edgecolor=BORDER,
                zorder=-10,
            )
        )
        fig.text(
            left + 0.004,
            bottom + height - 0.16 / layout.height_in,
            panel["title"],
            color=TEXT,
            fontsize=9.5,
            weight="bold",
            va="center",
        )
        # plot area on the left, the legend table on the right (placement: right)
        legend_frac = 0.36 if grid["w"] <= 8 else 0.3
        pad_l = 0.42 / layout.width_in
        pad_b = 0.26 / layout.height_in
        pad_t = 0.34 / layout.height_in
        ax = fig.add_axes(
            (
                left + pad_l,
                bottom + pad_b,
                width * (1 - legend_frac) - pad_l,
                height - pad_b - pad_t,
            )
        )
        ax.set_facecolor(PANEL_BG)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(colors=MUTED, labelsize=7, length=0)
        ax.grid(True, color=GRID, linewidth=0.7)
        ax.set_xlim(t0, t1)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.xaxis.set_major_locator(mdates.MinuteLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(_axis_formatter(unit)))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=2))
        if not series:
            ax.text(
                0.5, 0.5, "No data", color=MUTED, ha="center", va="center", transform=ax.transAxes
            )
            ax.set_ylim(0, 1)
            continue
        custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
        stacked = custom.get("stacking", {}).get("mode") == "normal"
        fill = float(custom.get("fillOpacity", 0)) / 100
        width_px = float(custom.get("lineWidth", 1))
        calcs = panel.get("options", {}).get("legend", {}).get("calcs", [])
        rows = []
        base = [0.0] * len(_grid(data))
        ymax = 0.0
        grid_ts = _grid(data)
        xs = [mdates.date2num(_utc(t)) for t in grid_ts]
        for index, s in enumerate(series):
            color = PALETTE[index % len(PALETTE)]
            by_t = {round(t, 3): v for t, v in s["points"]}
            # missing steps stay NaN: the line breaks there, as in Grafana
            ys = [by_t.get(round(t, 3), math.nan) for t in grid_ts]
            if stacked:
                low = list(base)
                high = [lo + (0.0 if math.isnan(v) else v) for lo, v in zip(low, ys, strict=True)]
                base = high
                shown = [math.nan if math.isnan(v) else h for h, v in zip(high, ys, strict=True)]
                ax.plot(xs, shown, color=color, linewidth=width_px)
                ax.fill_between(xs, low, high, color=color, alpha=fill, linewidth=0)
                ymax = max([ymax, *high])
            else:
                ax.plot(xs, ys, color=color, linewidth=width_px)
                if fill:
                    filled = [0.0 if math.isnan(v) else v for v in ys]
                    where = [not math.isnan(v) for v in ys]
                    ax.fill_between(xs, 0, filled, where=where, color=color, alpha=fill, lw=0)
                ymax = max([ymax, *[v for v in ys if not math.isnan(v)]])
            rows.append((color, s["name"], [_reduce(c, s["points"]) for c in calcs]))
        ax.set_ylim(0, ymax * 1.12 if ymax > 0 else 1)
        _legend_table(
            fig,
            rows,
            calcs,
            unit,
            left + width * (1 - legend_frac) + 0.1 / layout.width_in,
            bottom + height - pad_t,
            width * legend_frac - 0.16 / layout.width_in,
            height - pad_t - 0.1 / layout.height_in,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=layout.dpi, facecolor=BG)
    plt.close(fig)
    _shrink_png(out)


def _grid(data: dict[str, Any]) -> list[float]:
    """The query_range evaluation times: start, start + step, ... up to end."""
    start, end, step = data["start"], data["end"], data["step"]
    return [start + k * step for k in range(int((end - start) / step + 1e-9) + 1)]


def _utc(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


def _legend_table(
    fig: Any,
    rows: list[tuple[str, str, list[float]]],
    calcs: list[str],
    unit: str | None,
    x: float,
    top: float,
    width: float,
    height: float,
) -> None:
    names = {"lastNotNull": "Last *", "max": "Max", "mean": "Mean", "last": "Last"}
    line = min(0.016, height / (len(rows) + 1.4))
    size = 7 if line >= 0.009 else 6
    value_w = width * 0.2
    name_w = width - value_w * len(calcs)
    y = top - line * 0.5
    for i, calc in enumerate(calcs):
        fig.text(
            x + name_w + value_w * (i + 1),
            y,
            names.get(calc, calc),
            color=MUTED,
            fontsize=size,
            ha="right",
            va="center",
        )
    for color, name, values in rows:
        y -= line
        fig.patches.append(
            FancyRect(x, y - line * 0.12, width * 0.035, line * 0.24, color).patch(fig)
        )
        limit = max(8, int(name_w / width * 34 * (7 / size)))
        label = name if len(name) <= limit else name[: limit - 1] + "…"
        fig.text(x + width * 0.05, y, label, color=TEXT, fontsize=size, va="center")
        for i, value in enumerate(values):
            fig.text(
                x + name_w + value_w * (i + 1),
                y,
                fmt_value(value, unit).replace(" req/s", "/s"),
                color=TEXT,
                fontsize=size,
                ha="right",
                va="center",
            )


@dataclass
class FancyRect:
    x: float
    y: float
    w: float
    h: float
    color: str

    def patch(self, fig: Any) -> Any:
        from matplotlib.patches import Rectangle

        return Rectangle(
            (self.x, self.y), self.w, self.h, transform=fig.transFigure, color=self.color
        )


def _shrink_png(path: Path) -> None:
    """Quantize to a palette: a dashboard has few colours, and the file gets small."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


# ------------------------------------------------------------------ the run


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Prometheus:
    """A real Prometheus scraping the ingest and the worker every SCRAPE_S seconds."""

    def __init__(self, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise SystemExit("prometheus is not on PATH (Debian: apt-get install prometheus)")
        self.dir = Path(tempfile.mkdtemp(prefix="bridge-dashboard-prom-"))
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            for job, target in targets.items()
        )
        config = self.dir / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_S}s\n  evaluation_interval: {SCRAPE_S}s\n"
            f"scrape_configs:\n{jobs}"
        )
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = (self.dir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply,
            ):
                if reply.status == 200:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"prometheus did not start; see {self.dir / 'prometheus.log'}")
            time.sleep(0.2)

    def targets_up(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as reply:
            active = json.load(reply)["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _harness(redis_url: str, workers: int) -> Any:
    from bridge import bench
    from bridge.settings import load_settings

    args = argparse.Namespace(
        broker="redis",
        redis_url=redis_url,
        broker_db=REDIS_DB,
        state_db=REDIS_DB,
        amqp_url="",
        flavor="serviceops",
        itsm_latency_ms=15.0,
        workers=workers,
        act_pool=None,
        intake_prefetch=1,
        keep_logs=False,
        profile=None,
    )
    h: Any = bench.Harness(args)
    h.metrics_port = _free_port()
    h.env.update(
        {
            "BRIDGE_REDIS_PREFIX": PREFIX,
            "BRIDGE_WORKER_METRICS_PORT": str(h.metrics_port),
            "BRIDGE_RETRY_MAX_ATTEMPTS": "4",
            "BRIDGE_RETRY_MAX_AGE_S": "20",
            "BRIDGE_RETRY_BASE_DELAY_S": "1",
            "BRIDGE_RETRY_MAX_DELAY_S": "6",
            "BRIDGE_RETRY_AFTER_CAP_S": "6",
            "BRIDGE_DEDUP_UPDATE_INTERVAL_S": "15",
            "BRIDGE_ITSM_BREAKER_FAILURES": "10",
            "BRIDGE_ITSM_BREAKER_OPEN_S": "8",
            "BRIDGE_ITSM_READ_TIMEOUT_S": "2",
            "BRIDGE_ITSM_CONNECT_TIMEOUT_S": "1",
        }
    )
    h.settings = load_settings(env=h.env)
    return h


class Driver:
    """Offered load through the ingest, on a timeline of fractions of the run."""

    def __init__(self, h: Any, seconds: float) -> None:
        self.h = h
        self.seconds = seconds
        self.port = int(h.ingest_url.rsplit(":", 1)[1])
        from bridge.bench import INGEST_TOKEN

        self.token = INGEST_TOKEN
        self.rng = random.Random(7)
        self.next_new = 0
        self.open_keys: list[str] = []
        self.resolved: list[str] = []
        self.statuses: dict[int, int] = {}
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)

    def post(self, path: str, payload: Any, token: str | None = None, raw: bytes | None = None):
        body = raw if raw is not None else orjson.dumps(payload)
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token or self.token}",
        }
        for _ in range(2):
            try:
                self.conn.request("POST", path, body=body, headers=headers)
                reply = self.conn.getresponse()
                reply.read()
                self.statuses[reply.status] = self.statuses.get(reply.status, 0) + 1
                return reply.status
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        return 0

    # alerts of three sources
    def am(self, fingerprints: list[str], status: str = "firing", severity: str = "warning"):
        from bridge.bench import am_alert, am_payload

        alerts = []
        for fp in fingerprints:
            alert = am_alert(fp, f"p99 latency above 1 s on {fp[-6:]}", status)
            alert["labels"]["severity"] = severity
            alerts.append(alert)
        return self.post("/api/v1/alerts/alertmanager", am_payload(alerts))

    def grafana(self, fp: str, status: str = "firing"):
        from bridge.bench import am_alert, am_payload

        alert = am_alert(fp, f"disk almost full on {fp[-6:]}", status)
        alert["labels"]["alertname"] = "DiskFull"
        payload = am_payload([alert])
        payload["version"] = "1"
        return self.post("/api/v1/alerts/grafana", payload)

    def pagerduty(self, key: str, action: str = "trigger"):
        event = {
            "routing_key": self.token,
            "event_action": action,
            "dedup_key": key,
            "payload": {"summary": f"queue backlog on {key}", "source": key, "severity": "error"},
        }
        return self.post("/v2/enqueue", event)

    def new_problem(self) -> None:
        i = self.next_new
        self.next_new += 1
        kind = i % 5
        if kind == 3:
            self.grafana(f"g{i:015x}")
        elif kind == 4:
            self.pagerduty(f"pd-{i:06d}")
        else:
            self.am([f"n{i:015x}"], severity="critical" if i % 7 == 0 else "warning")
        self.open_keys.append(str(i))

    def resolve_some(self, count: int) -> None:
        for _ in range(min(count, len(self.open_keys))):
            i = int(self.open_keys.pop(self.rng.randrange(len(self.open_keys))))
            kind = i % 5
            if kind == 3:
                self.grafana(f"g{i:015x}", "resolved")
            elif kind == 4:
                self.pagerduty(f"pd-{i:06d}", "resolve")
            else:
                self.am([f"n{i:015x}"], status="resolved")
            self.resolved.append(str(i))

    def relapse_some(self, count: int) -> None:
        for _ in range(min(count, len(self.resolved))):
            i = int(self.resolved.pop(self.rng.randrange(len(self.resolved))))
            if i % 5 == 3:
                self.grafana(f"g{i:015x}")
            elif i % 5 == 4:
                self.pagerduty(f"pd-{i:06d}")
            else:
                self.am([f"n{i:015x}"], severity="critical")
            self.open_keys.append(str(i))

    def storm(self, keys: int, batch: int) -> None:
        """Repeats of a fixed set of keys (HA Alertmanager pairs resending groups)."""
        base = self.rng.randrange(keys)
        fps = [f"s{(base + j) % keys:015x}" for j in range(batch)]
        self.am(fps)

    def rejected(self) -> None:
        self.post("/api/v1/alerts/alertmanager", None, token="not-a-token", raw=b"{}")
        self.post("/api/v1/alerts/alertmanager", None, raw=b'{"alerts": [')
        self.post("/api/v1/alerts/alertmanager", {"alerts": [{"labels": 5}]})

    def duplicate_incidents(self, n: int) -> None:
        """Two open incidents carrying one key, made behind the bridge's back."""
        from bridge.bench import am_alert, am_payload
        from bridge.itsm.client import build_client
        from bridge.keys import with_key
        from bridge.mapping import Mapper
        from bridge.sources import parse

        fp = f"dup{n:013x}"
        alert = with_key(
            parse("alertmanager", am_payload([am_alert(fp, "twin")]))[0], self.h.settings
        )
        client = build_client(self.h.settings, self.h.state)
        draft = Mapper(self.h.settings.mapping).draft(alert)
        for _ in range(2):
            client.create(draft, alert.key or "")
        self.am([fp])


def drive(h: Any, seconds: float) -> None:
    d = Driver(h, seconds)
    sim = h.sim
    sim.expire_tokens_after(20)  # refresh grants during the run
    t0 = time.monotonic()
    done: set[str] = set()

    def once(name: str, at: float, action: Callable[[], None]) -> None:
        if name not in done and elapsed >= at * seconds:
            done.add(name)
            _note(f"  {name}")
            action()

    def outage_down() -> None:
        sim.stop()

    def outage_up() -> None:
        sim.start()

    def replay() -> None:
        result = subprocess.run(
            [sys.executable, "-m", "bridge.cli", "dlq", "replay", "--all"],
            cwd=ROOT,
            env=h.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        _note("  " + (result.stdout.strip().splitlines() or ["(no output)"])[-1])

    tick = 0.5
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= seconds:
            break
        frac = elapsed / seconds
        # steady background: new problems, repeats, a little noise
        for _ in range(d.rng.choice((0, 1, 1, 2)) if frac < 0.75 else d.rng.choice((0, 1))):
            d.new_problem()
        d.storm(keys=60, batch=d.rng.choice((5, 10, 20)))
        if 0.08 <= frac < 0.22:  # the storm: repeats of 300 keys
            for _ in range(8):
                d.storm(keys=300, batch=50)
        if int(elapsed / tick) % 10 == 0:
            d.rejected()
        if 0.25 <= frac < 0.42 or frac >= 0.8:
            d.resolve_some(d.rng.choice((1, 2, 3)))
        if 0.32 <= frac < 0.42 or frac >= 0.85:
            d.relapse_some(1)
        once("duplicate incidents for one key (anomaly)", 0.18, lambda: d.duplicate_incidents(1))
        once("duplicate incidents for another key", 0.3, lambda: d.duplicate_incidents(2))
        once(
            "ITSM rejects creates (400)",
            0.36,
            lambda: sim.fail_next(6, 400, operations=("create",), body='{"userMessage":"no"}'),
        )
        # faults small enough to be used up before the outage: behind an open breaker
        # only one probe call per open period reaches the ITSM
        once(
            "ITSM answers 503 with Retry-After",
            0.4,
            lambda: sim.fail_next(12, 503, retry_after="2"),
        )
        once("ITSM hangs past the read timeout", 0.46, lambda: sim.hang_next(3, 4.0))
        once("ITSM down", 0.52, outage_down)
        once("ITSM back", 0.66, outage_up)
        once("bridge dlq replay --all", 0.76, replay)
        time.sleep(max(0.0, tick - (time.monotonic() - t0 - elapsed)))
    _note(f"  ingest answers: {dict(sorted(d.statuses.items()))}")


def run(minutes: float, redis_url: str, workers: int) -> tuple[str, Prometheus, Any, float]:
    h = _harness(redis_url, workers)
    prom = None
    try:
        h.fresh()
        h.start_workers()
        h.start_ingest()
        ingest = h.ingest_url.removeprefix("http://")
        prom = Prometheus(
            {
                "bridge-ingest": ingest,
                "bridge-worker": f"127.0.0.1:{h.metrics_port}",
            }
        )
        deadline = time.monotonic() + 60
        while not prom.targets_up():
            if time.monotonic() > deadline:
                raise SystemExit(f"scrape targets not up; see {h.workdir}")
            time.sleep(1)
        start = time.time()
        _note(f"driving the bridge for {minutes:g} min (Prometheus {prom.url})")
        drive(h, minutes * 60)
        time.sleep(3 * SCRAPE_S)
        return prom.url, prom, h, start
    except BaseException:
        if prom is not None:
            prom.close()
        h.close()
        raise


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.render_dashboard", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--run-minutes", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=3, help="prefork pool processes")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--prometheus", help="render from this Prometheus; no run")
    parser.add_argument("--start", type=float, help="with --prometheus: window start (unix s)")
    parser.add_argument("--end", type=float, help="with --prometheus: window end (unix s)")
    parser.add_argument("--step", type=float, default=SCRAPE_S)
    parser.add_argument("--save-data", type=Path, help="also write the query results here")
    parser.add_argument("--from-data", type=Path, help="draw saved query results; no queries")
    args = parser.parse_args(argv)
    dashboard = json.loads(args.dashboard.read_text())

    if args.from_data:
        data = json.loads(args.from_data.read_text())
    elif args.prometheus:
        end = args.end or time.time()
        start = args.start or end - 3600
        data = collect(dashboard, args.prometheus.rstrip("/"), start, end, args.step)
    else:
        url, prom, h, start = run(args.run_minutes, args.redis_url, args.workers)
        try:
            data = collect(dashboard, url, start, time.time(), args.step)
        finally:
            prom.close()
            h.close()
    data.setdefault(
        "subtitle",
        f"real run: {(data['end'] - data['start']) / 60:.1f} min, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(data['start']))}-"
        f"{time.strftime('%H:%M', time.gmtime(data['end']))} UTC, "
        f"Prometheus scrape {SCRAPE_S}s, $__rate_interval={RATE_INTERVAL}",
    )
    if args.save_data:
        args.save_data.write_text(json.dumps(data))
    empty = [
        p["title"]
        for p in panels_of(dashboard)
        if not any(s["points"] for s in data["panels"].get(str(p["id"]), []))
    ]
    render(dashboard, data, args.out, data["subtitle"])
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1024:.0f} KB)")
    if empty:
        print("panels without data: " + "; ".join(empty))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
