"""Which server an HTTP request goes to: a pool of replicas, each with bounded concurrency.

Every server has ``capacity`` slots (requests in flight at most). A request asks the pool for a
slot, preferring servers that are in rotation and that it has tried least, so a failed attempt
is retried on another server first. A server that fails (a connection refused at once;
timeouts, dropped connections and 5xx after ``down_after`` in a row) leaves the rotation for
``cooldown_s`` and is tried again after that; one success puts it back. While every server is
out of rotation requests still go to them (the one back soonest first) and the caller's backoff
paces the attempts: the pool never waits out a cooldown, so a dead fleet fails fast. Each
request may make ``budget`` attempts on each server; a server that refuses the credentials, the
model or the path (401/403/404) is out for good. Nothing here speaks HTTP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# What an attempt's outcome says about the server that answered it.
OK = "ok"  # it answered (whatever the status: the server is alive)
FAILED = "failed"  # timeout, dropped connection, 5xx: maybe overloaded, maybe dying
UNREACHABLE = "unreachable"  # connection refused / cannot connect: out of rotation at once
BUSY = "busy"  # 429: alive, asked us to wait (``retry_after``)
BROKEN = "broken"  # 401/403/404: no request will ever succeed there


class PoolExhausted(RuntimeError):
    """Every server of the pool is broken (401/403/404): the run cannot go on."""


class PoolStopped(RuntimeError):
    """The pool was stopped (close or Ctrl-C) while a request waited for a slot."""


@dataclass
class Server:
    """One server's state. Counters are for notes and tests."""

    url: str
    capacity: int
    in_flight: int = 0
    failures: int = 0  # consecutive failed attempts
    down_until: float = 0.0  # out of rotation until then (monotonic clock)
    broken: str | None = None  # why it is out for good
    attempts: int = 0
    answered: int = 0  # attempts that got a response (any status)
    outages: int = 0  # times it left the rotation
    last_error: str = ""


class EndpointPool:
    def __init__(
        self,
        urls: list[str],
        capacity: int,
        cooldown_s: float = 30.0,
        down_after: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not urls:
            raise ValueError("EndpointPool needs at least one URL")
        self.servers = [Server(u, capacity) for u in urls]
        self.cooldown_s = float(cooldown_s)
        self.down_after = down_after
        self._clock = clock
        self._cond = threading.Condition()

    @property
    def capacity(self) -> int:
        return sum(s.capacity for s in self.servers)

    def acquire(self, tries: dict[str, int], budget: int, stop: threading.Event) -> Server | None:
        """A slot on the best server for a request that made ``tries[url]`` attempts per server:
        in rotation before out of it, then fewest tries by this request, then least loaded.
        Blocks while that best kind of server has no free slot. None when the request has
        spent its ``budget`` on every server that is not broken."""
        with self._cond:
            while True:
                if stop.is_set():
                    raise PoolStopped
                live = [s for s in self.servers if s.broken is None]
                if not live:
                    raise PoolExhausted("; ".join(f"{s.url}: {s.broken}" for s in self.servers))
                now = self._clock()
                eligible = [s for s in live if tries.get(s.url, 0) < budget]
                if not eligible:
                    return None
                rank = {id(s): (s.down_until > now, tries.get(s.url, 0)) for s in eligible}
                best = min(rank.values())
                tier = [s for s in eligible if rank[id(s)] == best]
                free = [s for s in tier if s.in_flight < s.capacity]
                if free:
                    # Out of rotation, the one back soonest; else the least loaded.
                    server = min(
                        free, key=lambda s: (max(s.down_until, now), s.in_flight / s.capacity)
                    )
                    server.in_flight += 1
                    server.attempts += 1
                    return server
                # Wake on a release, or soon anyway: a cooldown may end, or stop be set.
                self._cond.wait(timeout=0.2)

    def release(
        self,
        server: Server,
        outcome: str | None,
        error: str = "",
        retry_after: float | None = None,
    ) -> None:
        """Give the slot back and note what the attempt said about the server (``None``: no
        attempt was made, it says nothing)."""
        with self._cond:
            server.in_flight -= 1
            if outcome is None:
                server.attempts -= 1
            now = self._clock()
            if outcome in (OK, BUSY, BROKEN):
                server.answered += 1
            if outcome == OK:
                server.failures = 0
                server.down_until = 0.0
            elif outcome == BUSY:
                if retry_after:  # send nothing more there until it said to come back
                    server.down_until = max(
                        server.down_until, now + min(retry_after, self.cooldown_s)
                    )
            elif outcome == BROKEN:
                server.broken = server.last_error = error
            else:
                server.failures += 1
                server.last_error = error
                if outcome == UNREACHABLE or server.failures >= self.down_after:
                    # Said once per outage, in the run's summary (``notes``), not as log lines
                    # that would break a progress bar or a one-line error.
                    server.outages += server.down_until <= now
                    server.down_until = now + self.cooldown_s
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake requests waiting for a slot (they then see a stop)."""
        with self._cond:
            self._cond.notify_all()

    def notes(self) -> list[str]:
        """One line per server that failed, for a run's summary (empty when all went well)."""
        with self._cond:
            return [
                f"{s.url}: " + (
                    f"out for good ({s.broken})" if s.broken
                    else f"out of rotation {s.outages}x (last: {s.last_error})"
                ) + f"; {s.answered} of {s.attempts} attempts answered"
                for s in self.servers
                if s.broken or s.outages
            ]  # fmt: skip
