"""Request counts and latencies for ``/metrics`` (recent latencies kept, percentiles on read)."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict, deque
from typing import Any

import numpy as np

RECENT = 2048  # latencies kept per route and per model: percentiles over recent traffic


def percentiles_ms(seconds: deque[float] | list[float]) -> dict[str, Any]:
    """``{"n", "p50", "p95"}`` in milliseconds (``None`` when nothing was recorded)."""
    if not seconds:
        return {"n": 0, "p50": None, "p95": None}
    values = np.asarray(list(seconds)) * 1000.0
    return {
        "n": len(values),
        "p50": round(float(np.percentile(values, 50)), 3),
        "p95": round(float(np.percentile(values, 95)), 3),
    }


class Telemetry:
    """Thread-safe counters: every HTTP request by route and status; model work by model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.route_latency: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=RECENT))
        self.model_latency: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=RECENT))
        self.model_requests: Counter = Counter()
        self.model_tokens: Counter = Counter()

    def http(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.status[route][str(status)] += 1
            self.route_latency[route].append(seconds)

    def model(self, name: str, seconds: float, completion_tokens: int) -> None:
        """One finished piece of model work (a whole completion, streamed or not)."""
        with self._lock:
            self.model_requests[name] += 1
            self.model_tokens[name] += completion_tokens
            self.model_latency[name].append(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": {
                    "total": sum(sum(c.values()) for c in self.status.values()),
                    "by_route": {r: dict(c) for r, c in sorted(self.status.items())},
                },
                "latency_ms": {r: percentiles_ms(d) for r, d in sorted(self.route_latency.items())},
                "models": {
                    name: {
                        "completions": self.model_requests[name],
                        "completion_tokens": self.model_tokens[name],
                        "latency_ms": percentiles_ms(self.model_latency[name]),
                    }
                    for name in sorted(self.model_requests)
                },
            }
