"""Operator-facing counters of the diagnosis service, and per-clinic rate limits.

`Metrics` renders the Prometheus text exposition format (version 0.0.4) at GET /metrics: request
counts and time by route template and status, evaluations and their time by model, rate-limited
requests, and the pool's state. Labels are route templates and model names only, never a clinic,
a key id or anything from a request body, so the endpoint tells an onlooker no more than /health.

`RateLimiter` is a token bucket per clinic: `per_minute` requests a minute on average, bursts of
up to `burst`; beyond it 429 with the seconds until the next request would be let in.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._request_seconds: dict[tuple[str, str], float] = defaultdict(float)
        self._evaluations: dict[str, int] = defaultdict(int)
        self._evaluation_seconds: dict[str, float] = defaultdict(float)
        self._rate_limited = 0

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(method, route, status)] += 1
            self._request_seconds[(method, route)] += seconds

    def evaluation(self, model: str, seconds: float) -> None:
        with self._lock:
            self._evaluations[model] += 1
            self._evaluation_seconds[model] += seconds

    def rate_limited(self) -> None:
        with self._lock:
            self._rate_limited += 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges`: name -> (help, value) read at scrape time."""
        lines = []

        def family(name: str, kind: str, help_text: str, samples) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                text = ",".join(f'{k}="{_label(str(v))}"' for k, v in labels.items())
                lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")

        with self._lock:
            family("medhe_requests_total", "counter", "HTTP requests by method, route template and status",
                   [({"method": m, "route": r, "status": s}, n) for (m, r, s), n in sorted(self._requests.items())])
            family("medhe_request_seconds_total", "counter", "time spent answering requests, by method and route",
                   [({"method": m, "route": r}, round(t, 6)) for (m, r), t in sorted(self._request_seconds.items())])
            family("medhe_evaluations_total", "counter", "encrypted evaluations by model",
                   [({"model": k}, n) for k, n in sorted(self._evaluations.items())])
            family("medhe_evaluation_seconds_total", "counter", "time in encrypted evaluation by model",
                   [({"model": k}, round(t, 6)) for k, t in sorted(self._evaluation_seconds.items())])
            family("medhe_rate_limited_total", "counter", "requests refused by a clinic's rate limit",
                   [({}, self._rate_limited)])
        for name, (help_text, value) in gauges.items():
            family(name, "gauge", help_text, [({}, value)])
        return "\n".join(lines) + "\n"


MAX_TRACKED = 4096


class RateLimiter:
    """A token bucket per clinic (or per client address without access control)."""

    def __init__(self, per_minute: float, burst: int | None = None, clock=time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError("a rate limit is a positive number of requests per minute")
        self.rate_per_s = per_minute / 60.0
        self.burst = max(1, burst if burst is not None else math.ceil(per_minute / 6))  # 10 s worth by default
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # who -> (tokens, time of that count)
        self._lock = threading.Lock()

    def take(self, who: str) -> float:
        """0.0 if `who` may make a request now (and counts it), else the seconds until it may."""
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(who, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate_per_s)
            if len(self._buckets) > MAX_TRACKED and who not in self._buckets:
                # Forget callers whose bucket has refilled: they are back where a new one starts.
                refill_s = self.burst / self.rate_per_s
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill_s}
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s
