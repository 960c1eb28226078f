"""A real OpenAI-compatible chat completions server on loopback, for backend and teacher tests.

It can be told to answer with 429 + Retry-After, 5xx, slow responses, and it checks the
Authorization header. It records every request, the auth headers seen and the maximum number
of requests in flight at once. Run in a thread (``with FakeOpenAI() as srv: srv.url``) or as a
script (``python tests/fake_openai.py --port-file F``) for tests that kill a client process.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def echo_responder(body: dict) -> str:
    user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    return f"echo: {user} (seed={body.get('seed')})"


class FakeOpenAI:
    def __init__(
        self,
        api_key: str | None = None,
        responder: Callable[[dict], str] = echo_responder,
        delay_s: float = 0.0,
    ):
        self.api_key = api_key
        self.responder = responder
        self.delay_s = delay_s
        self.script: deque = deque()  # actions for the next requests, in arrival order
        self.requests: list[dict] = []
        self.arrivals: list[float] = []
        self.auth_headers: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def push(self, *actions: dict) -> None:
        """Queue actions: {"status": 429, "retry_after": "1"}, {"status": 500}, {"delay": 2}."""
        with self._lock:
            self.script.extend(actions)

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                auth = self.headers.get("Authorization")
                with fake._lock:
                    fake.requests.append(body)
                    fake.arrivals.append(time.monotonic())
                    fake.auth_headers.append(auth)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    action = fake.script.popleft() if fake.script else {}
                try:
                    time.sleep(action.get("delay", fake.delay_s))
                    if not self.path.endswith("/v1/chat/completions"):
                        return self._send(404, {"error": f"no route {self.path}"})
                    if fake.api_key is not None and auth != f"Bearer {fake.api_key}":
                        # Like some real servers, echo what was sent: the client must redact it.
                        return self._send(401, {"error": f"invalid credentials: {auth}"})
                    status = action.get("status", 200)
                    if status != 200:
                        headers = {}
                        if "retry_after" in action:
                            headers["Retry-After"] = str(action["retry_after"])
                        return self._send(status, {"error": f"status {status}"}, headers)
                    text = fake.responder(body)
                    return self._send(
                        200,
                        {
                            "id": "cmpl-test",
                            "object": "chat.completion",
                            "model": body.get("model"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {
                                "prompt_tokens": sum(
                                    len(m["content"].split()) for m in body["messages"]
                                ),
                                "completion_tokens": len(text.split()),
                            },
                        },
                    )
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-file", required=True, help="write the base URL here when ready")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    srv = FakeOpenAI(delay_s=args.delay).start()
    Path(args.port_file).write_text(srv.url)
    threading.Event().wait()


if __name__ == "__main__":
    main()
