"""``distiller serve`` against the real server: a subprocess on a loopback port, driven with the
official ``openai`` client and raw HTTP, and its page in headless Chromium.

Every answer is checked against the same work done in-process: greedy decoding of a prompt must
give exactly what ``generate_one`` gives (the batched and single-stream paths give the same
tokens), label rankings what ``rank_labels`` gives. That holds on any CPU: both sides run the
same model with the same numerics on the same machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from distiller.decoding import Decoding
from distiller.generate import build_messages, chat_prompt, generate_one
from distiller.models import load_model

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")

REPO = Path(__file__).resolve().parent.parent
LOAD_SECONDS = 3.0  # bounded: the CPU is shared
LOAD_CLIENTS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``distiller serve`` subprocess; ``log`` is everything it printed."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distiller.cli", "serve", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"distiller serve exited {self.proc.returncode}:\n{self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"distiller serve did not come up:\n{self.log}")

    @property
    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8")

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


CLASSIFY_SPEC = (REPO / "fixtures/tasks/label_ranking.yaml").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """label_ranking with eval.classify: validators give verdicts, labels get ranked."""
    text = CLASSIFY_SPEC.replace(
        "file: label_ranking/incidents.yaml",
        f"file: {REPO / 'fixtures/tasks/label_ranking/incidents.yaml'}",
    )
    assert "eval:\n" in text
    text = text.replace("eval:\n", "eval:\n  classify: {decoder: ranking, calibrate: true}\n", 1)
    path = tmp_path_factory.mktemp("spec") / "label_ranking.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tiny_model_factory) -> dict[str, Path]:
    # Two different models, so an answer from the wrong one would show.
    return {"teacher": tiny_model_dir, "distilled": tiny_model_factory(seed=1)}


@pytest.fixture(scope="module")
def server(models, spec_path, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
    srv = Server(
        [*args, "--spec", str(spec_path), "--max-body-bytes", "65536", "--max-tokens", "64"],
        log,
    )
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def loaded(models) -> dict[str, tuple]:
    return {name: load_model(path) for name, path in models.items()}


def reference(loaded, name: str, prompt: str, decoding: Decoding) -> str:
    model, tokenizer = loaded[name]
    ids = chat_prompt(tokenizer, build_messages(prompt))
    return generate_one(model, tokenizer, ids, decoding).text


# -- the OpenAI API --------------------------------------------------------------------------


def test_models_lists_every_served_model(server: Server) -> None:
    assert [m.id for m in server.client().models.list().data] == ["teacher", "distilled"]


def test_completion_is_what_generate_one_gives(server: Server, loaded) -> None:
    client = server.client()
    for name in ("teacher", "distilled"):
        got = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "Name a prime number."}],
            max_tokens=16,
            temperature=0,
        )
        want = reference(loaded, name, "Name a prime number.", Decoding(max_tokens=16))
        assert got.choices[0].message.content == want
        assert got.model == name
        assert got.usage.completion_tokens <= 16
        assert got.choices[0].finish_reason in ("stop", "length")
    # The two random models answer differently: the check above could tell them apart.
    assert reference(loaded, "teacher", "Name a prime number.", Decoding(max_tokens=16)) != (
        reference(loaded, "distilled", "Name a prime number.", Decoding(max_tokens=16))
    )


def test_stream_gives_the_same_text_and_a_verdict(server: Server, loaded) -> None:
    """Streamed text is exactly the final text, with and without a stop string (one taken
    from the middle of the unstopped answer, so it is met), and ends with the verdict."""
    from distiller.spec import load_spec
    from distiller.validators import build_validator

    client = server.client()
    validator = build_validator(load_spec(server_spec(server)).validators)
    sampled = {"max_tokens": 20, "temperature": 1.0, "seed": 3}
    full = reference(loaded, "teacher", "Say something.", Decoding(**sampled))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    for stops in ([], [stop]):
        want = reference(
            loaded, "teacher", "Say something.", Decoding(**sampled, stop=tuple(stops))
        )
        assert (want == full) == (not stops)  # the premise: the stop string cuts the text
        chunks = list(
            client.chat.completions.create(
                model="teacher",
                messages=[{"role": "user", "content": "Say something."}],
                stop=stops or None,
                stream=True,
                stream_options={"include_usage": True},
                **sampled,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want
        final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        extra = final.model_extra["distiller"]
        assert extra["verdict"] == validator(want).to_dict()
        assert extra["latency_s"] > 0
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def server_spec(server: Server) -> str:
    args = server.proc.args
    return args[args.index("--spec") + 1]


def test_seeded_sampling_does_not_depend_on_the_batch(server: Server, loaded) -> None:
    client = server.client()
    decoding = Decoding(temperature=1.0, top_p=0.9, max_tokens=12, seed=7)
    want = reference(loaded, "distilled", "Pick a colour.", decoding)
    results: list[str] = []

    def ask() -> None:
        r = client.chat.completions.create(
            model="distilled",
            messages=[{"role": "user", "content": "Pick a colour."}],
            max_tokens=12, temperature=1.0, top_p=0.9, seed=7,
        )  # fmt: skip
        results.append(r.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 4


# -- under load ------------------------------------------------------------------------------


def test_concurrent_clients_get_their_own_answers(server: Server, loaded) -> None:
    """LOAD_CLIENTS clients for LOAD_SECONDS, each asking distinct prompts of both models
    (every third one streamed), sampled with a seed of its own: every answer is the one
    generate_one gives for that prompt and seed. Seeded samples of a random model differ from
    one another, so an answer handed to the wrong request cannot go unnoticed."""
    client = server.client()
    stop_at = time.monotonic() + LOAD_SECONDS
    # model, prompt, seed, text, seconds, completion tokens
    answers: list[tuple[str, str, int, str, float, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            name = ("teacher", "distilled")[(k + i) % 2]
            prompt = f"Client {k} asks question {i}: what is {k} plus {i}?"
            seed = 1000 * k + i
            start = time.perf_counter()
            try:
                if i % 3 == 2:
                    stream = client.chat.completions.create(
                        model=name, messages=[{"role": "user", "content": prompt}],
                        max_tokens=12, temperature=1.0, seed=seed, stream=True,
                        stream_options={"include_usage": True},
                    )  # fmt: skip
                    chunks = list(stream)
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    tokens = chunks[-1].usage.completion_tokens
                else:
                    r = client.chat.completions.create(
                        model=name, messages=[{"role": "user", "content": prompt}],
                        max_tokens=12, temperature=1.0, seed=seed,
                    )  # fmt: skip
                    text, tokens = r.choices[0].message.content, r.usage.completion_tokens
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return
            with lock:
                answers.append((name, prompt, seed, text, time.perf_counter() - start, tokens))
            i += 1

    wall = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(LOAD_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wall = time.perf_counter() - wall
    assert not errors, errors[:3]
    assert len(answers) >= LOAD_CLIENTS
    assert len({(m, p) for m, p, *_ in answers}) == len(answers)  # each prompt asked once
    for name, prompt, seed, text, *_ in answers:
        decoding = Decoding(temperature=1.0, max_tokens=12, seed=seed)
        assert text == reference(loaded, name, prompt, decoding), (name, prompt)
    assert len({a[3] for a in answers}) == len(answers)  # the premise: no two alike

    seconds = np.array([a[4] for a in answers])
    tokens = sum(a[5] for a in answers)
    metrics = httpx.get(f"{server.url}/metrics").json()
    batches = {n: m["worker"] for n, m in metrics["models"].items()}
    print(
        f"\nserve load: {LOAD_CLIENTS} clients, {len(answers)} requests in {wall:.1f}s; "
        f"latency p50 {np.percentile(seconds, 50) * 1000:.0f} ms, "
        f"p95 {np.percentile(seconds, 95) * 1000:.0f} ms; {tokens / wall:.1f} completion tok/s; "
        f"largest batch per model { ({n: b['largest_batch'] for n, b in batches.items()}) }"
    )
    assert metrics["in_flight"] == 0
    counted = sum(metrics["requests"]["by_route"]["/v1/chat/completions"].values())
    assert counted >= len(answers)
    assert metrics["latency_ms"]["/v1/chat/completions"]["p95"] is not None


def test_queued_completions_run_as_one_batch(loaded) -> None:
    """Completions queued while the worker is busy join one batch, streamed or not, each with
    its own answer (seeded samples: distinct, so a mix-up would show); a streamed one sees its
    text grow token by token up to the final text."""
    from distiller.serve.batching import CallJob, GenerateJob, ModelWorker

    model, tokenizer = loaded["teacher"]
    worker = ModelWorker("teacher", model, tokenizer, max_batch=8)
    release = threading.Event()
    try:
        busy = worker.submit(CallJob(lambda _m, _t: release.wait(30)))
        prompts = [f"Question number {i}?" for i in range(5)]
        decodings = [Decoding(temperature=1.0, max_tokens=10, seed=i) for i in range(5)]
        streamed: dict[int, list[str]] = {1: [], 3: []}
        jobs = [
            GenerateJob(
                chat_prompt(tokenizer, build_messages(p)),
                d,
                on_text=streamed[i].append if i in streamed else None,
            )
            for i, (p, d) in enumerate(zip(prompts, decodings, strict=True))
        ]
        futures = [worker.submit(j) for j in jobs]
        release.set()
        busy.result(timeout=30)
        generations = [f.result(timeout=60) for f in futures]
        texts = [g.text for g in generations]
    finally:
        worker.close()
    assert worker.stats.batches == 1 and worker.stats.largest_batch == 5
    assert worker.stats.streams == 2
    for i, seen in streamed.items():  # one update per decoding step, the last one the text
        assert len(seen) == generations[i].generation_tokens and seen[-1] == texts[i]
    want = [reference(loaded, "teacher", p, d) for p, d in zip(prompts, decodings, strict=True)]
    assert texts == want
    assert len(set(want)) == len(want)


def test_past_the_concurrency_limit_is_429(loaded) -> None:
    """The app in-process (its own worker), with its one slot taken: a clear 429, then a
    completion once the slot is free again."""
    from fastapi.testclient import TestClient

    from distiller.serve.app import Limits, ServeState, create_app
    from distiller.serve.batching import ModelWorker

    model, tokenizer = loaded["teacher"]
    state = ServeState(
        workers={"m": ModelWorker("m", model, tokenizer)}, limits=Limits(max_concurrency=1)
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    try:
        with TestClient(create_app(state)) as client:
            state.in_flight = 1  # as if one request were being served
            _error(client.post("/v1/chat/completions", json=body), 429, "at most 1")
            state.in_flight = 0
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert state.in_flight == 0
    finally:
        state.workers["m"].close()


def test_a_scaffolded_model_gets_the_teachers_prompt(loaded, spec_path: Path) -> None:
    """--scaffold: the spec's system prompt and few-shot turns go before the user's message
    (as the pipeline prompts its teacher), unless the request brings its own system message."""
    from fastapi.testclient import TestClient

    from distiller.serve.app import ServeState, create_app
    from distiller.serve.batching import ModelWorker
    from distiller.spec import load_spec

    spec = load_spec(spec_path)
    model, tokenizer = loaded["teacher"]
    state = ServeState(
        workers={"t": ModelWorker("t", model, tokenizer)}, spec=spec, scaffolded=frozenset({"t"})
    )
    user = "Incident: the login page is slow"
    decoding = Decoding(temperature=1.0, seed=5, max_tokens=8)
    scaffold = build_messages(user, spec.teacher.system_prompt, spec.teacher.few_shot)
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]
    try:
        with TestClient(create_app(state)) as client:
            for sent, seen in (
                ([{"role": "user", "content": user}], scaffold),
                (own_system, own_system),
            ):
                body = {
                    "model": "t",
                    "messages": sent,
                    "max_tokens": 8,
                    "temperature": 1.0,
                    "seed": 5,
                }
                got = client.post("/v1/chat/completions", json=body).json()
                ids = chat_prompt(tokenizer, seen)
                assert got["usage"]["prompt_tokens"] == len(ids)
                want = generate_one(model, tokenizer, ids, decoding).text
                assert got["choices"][0]["message"]["content"] == want
    finally:
        state.workers["t"].close()
    assert len(scaffold) > 2  # the premise: the spec has a system prompt and examples


# -- label ranking ---------------------------------------------------------------------------


def test_classify_matches_rank_labels(server: Server, loaded, spec_path: Path) -> None:
    from distiller.classify import rank_labels
    from distiller.spec import load_spec

    spec = load_spec(spec_path).eval.classify
    texts = ["the database is down", "a typo on the about page"]
    got = httpx.post(
        f"{server.url}/v1/classify", json={"model": "distilled", "input": texts}, timeout=60
    ).json()
    model, tokenizer = loaded["distilled"]
    want = rank_labels(
        model, tokenizer, [build_messages(t) for t in texts], list(spec.labels),
        content_free=[build_messages(t) for t in spec.content_free], calibrate=True,
    )  # fmt: skip
    assert got["labels"] == list(spec.labels)
    for row, w in zip(got["data"], want, strict=True):
        assert row["prediction"] == w.prediction
        for key in ("raw", "prior", "calibrated", "probabilities"):
            assert row[key] == pytest.approx(w.to_dict()[key], abs=1e-5), key
        probs = sorted(row["probabilities"].values(), reverse=True)
        assert row["margin"] == pytest.approx(probs[0] - probs[1], abs=1e-9)
        assert sum(probs) == pytest.approx(1.0)


# -- bad requests ----------------------------------------------------------------------------


def _error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for w in words:
        assert w in message, message


def test_bad_requests_get_clear_errors_and_the_server_stays_up(server: Server) -> None:
    url = f"{server.url}/v1/chat/completions"
    ok = {"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    _error(httpx.post(url, content=b'{"model": "teacher", "mess'), 400, "not valid JSON")
    _error(httpx.post(url, content=b"\xff\xfe"), 400, "not valid JSON")
    _error(httpx.post(url, json=[1, 2]), 400, "JSON object")
    _error(httpx.post(url, json={**ok, "model": "nope"}), 404, "'nope'", "teacher")
    _error(httpx.post(url, json={**ok, "max_tokens": -3}), 400, "max_tokens")
    _error(httpx.post(url, json={**ok, "max_tokens": 10_000}), 400, "max_tokens", "64")
    _error(httpx.post(url, json={**ok, "max_tokens": "many"}), 400, "max_tokens")
    _error(httpx.post(url, json={**ok, "temperature": -1}), 400, "temperature")
    _error(httpx.post(url, json={**ok, "top_p": 0}), 400, "top_p")
    _error(httpx.post(url, json={**ok, "messages": []}), 400, "messages")
    _error(
        httpx.post(url, json={**ok, "messages": [{"role": "robot", "content": "x"}]}), 400, "role"
    )
    _error(httpx.post(url, json={**ok, "stop": [1]}), 400, "stop")
    huge = {**ok, "messages": [{"role": "user", "content": "x" * 200_000}]}
    _error(httpx.post(url, json=huge), 413, "65536")

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while it is read
        yield b'{"model": "teacher", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 1024

    _error(httpx.post(url, content=chunked()), 413, "65536")
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=ok["messages"])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client().chat.completions.create(
            model="teacher", messages=ok["messages"], max_tokens=-1
        )

    # A client that goes away mid-stream: the generation stops, its slot is given back.
    with httpx.stream("POST", url, json={**ok, "stream": True, "max_tokens": 64}) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                break
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/metrics").json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server.url}/metrics").json()["in_flight"] == 0
    assert httpx.post(url, json=ok).status_code == 200  # still up and answering
    assert "Traceback" not in server.log


def test_api_key_from_the_environment(tiny_model_dir: Path, tmp_path: Path) -> None:
    srv = Server(
        ["--model", f"m={tiny_model_dir}", "--api-key-env", "SERVE_TEST_KEY"],
        tmp_path / "serve.log",
        env={"SERVE_TEST_KEY": "s3cret"},
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        assert [m.id for m in srv.client("s3cret").models.list().data] == ["m"]
        assert httpx.get(f"{srv.url}/health").status_code == 200  # liveness needs no key
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
    finally:
        srv.stop()
    assert "Traceback" not in srv.log_path.read_text(encoding="utf-8")


def test_api_key_env_unset_is_one_line(tiny_model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SERVE_UNSET_KEY"}
    r = subprocess.run(
        [sys.executable, "-m", "distiller.cli", "serve", "--model", f"m={tiny_model_dir}",
         "--api-key-env", "SERVE_UNSET_KEY"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert "SERVE_UNSET_KEY" in r.stderr and "Traceback" not in r.stderr


# -- the pages -------------------------------------------------------------------------------


def test_report_page_shows_plots(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "latest.json"
    report.write_text(json.dumps(SMALL_REPORT), encoding="utf-8")
    srv = Server(["--model", f"m={tiny_model_dir}", "--report", str(report)], tmp_path / "s.log")
    try:
        page = httpx.get(f"{srv.url}/report").text
        assert "/report/plots/format_rate.png" in page and "distilled" in page
        png = httpx.get(f"{srv.url}/report/plots/format_rate.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert httpx.get(f"{srv.url}/report/plots/..%2Flatest.json").status_code == 404
    finally:
        srv.stop()


SMALL_REPORT = {
    "created": "2026-01-01T00:00:00",
    "commit": "abc",
    "entries": {
        f"t/split:test/{m}": {
            "task": "t",
            "prompt_set": "split:test",
            "model": m,
            "n": 10,
            "format": {
                "k": k,
                "n": 10,
                "value": k / 10,
                "lo": max(0, k / 10 - 0.2),
                "hi": min(1, k / 10 + 0.2),
            },
            "task_metrics": {"accuracy": k / 10},
            "batch_decode_tps": 100.0 + k,
            "peak_memory_mb": 300.0 - k,
            "latency": {"decode_tps": 50.0 + k},
        }
        for m, k in (("teacher", 9), ("vanilla", 2), ("distilled", 8))
    },
    "extra": {},
}


CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
)
def test_page_in_headless_chromium(server: Server, loaded, spec_path: Path, tmp_path: Path) -> None:
    """Type a prompt, submit, read every model's streamed answer and verdict, screenshot."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the dev extra installs selenium")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from distiller.spec import load_spec
    from distiller.validators import build_validator

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    prompt = "Incident: the checkout page is down for everyone"
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer")) == 2)
        box = driver.find_element(By.ID, "max-tokens")
        box.clear()
        box.send_keys("24")
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        driver.find_element(By.ID, "send").click()
        wait.until(
            lambda d: all(
                a.get_attribute("data-state") in ("done", "error")
                for a in d.find_elements(By.CSS_SELECTOR, ".answer")
            )
        )
        tmp_path.joinpath("report").mkdir()
        shot = tmp_path / "report" / "serve_page.png"
        driver.save_screenshot(str(shot))
        validator = build_validator(load_spec(spec_path).validators)
        for a in driver.find_elements(By.CSS_SELECTOR, ".answer"):
            name = a.get_attribute("data-model")
            assert a.get_attribute("data-state") == "done", a.text
            want = reference(loaded, name, prompt, Decoding(max_tokens=24))
            # textContent, not .text: .text collapses the whitespace the answer may hold
            got = a.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
            assert got == want
            verdict = a.find_element(By.CSS_SELECTOR, ".verdict").text
            assert verdict == ("valid" if validator(want).passed else "invalid")
            assert "tok/s" in a.find_element(By.CSS_SELECTOR, ".stats").text
        assert shot.read_bytes().startswith(b"\x89PNG")
        if os.environ.get("SERVE_SCREENSHOT"):  # keep a copy to look at
            shutil.copy(shot, os.environ["SERVE_SCREENSHOT"])
    finally:
        driver.quit()


# -- verdicts that read the prompt ----------------------------------------------------------


def test_a_span_verdict_reads_the_prompt_it_answers(loaded, tmp_path: Path) -> None:
    """The ``span`` validator checks the answer against the passage in the prompt: the server
    passes each completion's prompt (the last user message, not the scaffold around it) and
    ``/v1/validate`` its ``prompt`` / ``fields``, as ``evaluate`` passes each eval prompt.
    Without them every span verdict would fail on "no passage"."""
    from fastapi.testclient import TestClient

    from distiller.serve.app import ServeState, create_app
    from distiller.serve.batching import ModelWorker
    from distiller.spec import Prompt, load_spec
    from distiller.validators import build_validator

    context = "Nadia Orlund reported the outage; Hugo Brannet rolled out the fix on May 5."
    (tmp_path / "qa.jsonl").write_text(
        json.dumps({"id": "q1", "context": context, "question": "Who fixed it?",
                    "reference": "Hugo Brannet"}) + "\n"
        + json.dumps({"id": "q2", "context": context, "question": "When was the fix?",
                      "reference": "May 5"}) + "\n"
        + json.dumps({"id": "q3", "context": context, "question": "Who reported it?",
                      "reference": "Nadia Orlund"}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    (tmp_path / "qa.yaml").write_text(
        "name: qa\n"
        'prompts: {file: qa.jsonl, template: "Context: {context}\\nQuestion: {question}"}\n'
        "teacher: {gold: true}\n"
        "validators: [{type: span, max_words: 4}]\n"
        "student: {model: ./no-such-student}\n"
        "split: {train: 0.34, valid: 0.33, test: 0.33}\n",
        encoding="utf-8",
    )
    spec = load_spec(tmp_path / "qa.yaml")
    validator = build_validator(spec.validators)
    model, tokenizer = loaded["teacher"]
    state = ServeState(
        workers={"t": ModelWorker("t", model, tokenizer)},
        spec=spec,
        validator=validator,
        scaffolded=frozenset({"t"}),
    )
    user = spec.prompts[0].text
    try:
        with TestClient(create_app(state)) as client:

            def validate(**body) -> dict:
                r = client.post("/v1/validate", json={"text": "Hugo Brannet", **body})
                assert r.status_code == 200, r.text
                return r.json()

            assert validate(prompt=user)["passed"]
            assert validate(fields={"context": context})["passed"]
            # the field wins over the prompt text, as in evaluate: "fixed" is only in the question
            assert not validate(text="fixed", prompt=user, fields={"context": context})["passed"]
            assert validate(text="fixed", prompt=user)["passed"]
            missed = validate(text="Ada Lovelace", prompt=user)
            assert not missed["passed"] and "is not a span of the passage" in " ".join(
                missed["reasons"]
            )
            assert "no passage" in " ".join(validate()["reasons"])  # nothing to check against
            r = client.post("/v1/validate", json={"text": "x", "fields": {"context": 3}})
            _error(r, 400, "fields: expected a mapping")

            body = {"model": "t", "messages": [{"role": "user", "content": user}],
                    "max_tokens": 6}  # fmt: skip
            got = client.post("/v1/chat/completions", json=body).json()
            text = got["choices"][0]["message"]["content"]
            want = validator(text, Prompt(id="request", text=user)).to_dict()
            assert got["distiller"]["verdict"] == want
            assert "no passage" not in " ".join(want["reasons"])
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                events = [
                    json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")
                ]
            streamed = "".join(
                e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]
            )
            assert streamed == text
            assert events[-1]["distiller"]["verdict"] == want
    finally:
        state.workers["t"].close()
