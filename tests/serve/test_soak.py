"""A bounded soak of the real server (`python -m lorakit serve` on loopback, stopped at the end).

64 client threads for LORAKIT_SOAK_SECONDS (30 by default; a few minutes for a longer run) mix
greedy completions and chats over three adapters and the base, full streams and streams dropped
after the first piece, malformed bodies, oversized prompts and bodies, wrong keys, unknown models
and mistyped fields, while one more thread hot-loads and unloads an adapter. Then:

* every request got exactly one answer (none lost, none answered twice: each reply's id is new and
  its text is the one greedy decoding gives for that request's own adapter and prompt);
* every error is OpenAI's shape {"error": {message, type, param, code}} with the expected status;
* the server's RSS is within 10% of its level after warm-up;
* the server still answers the same greedy outputs as at the start.

LORAKIT_SOAK_REPORT=FILE writes the figures (requests by kind, RSS) as JSON.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

import lorakit
from conftest import CHAT_TEMPLATE, TOY_TARGETS, perturb, toy_model_folder
from lorakit.models import load_causal_lm, load_tokenizer

KEY = "soak-key"
ADAPTERS = ["a", "b", "c"]
MODELS = ["toy", *ADAPTERS]
PROMPTS = ["say red", "say green", "### Instruction:\nsay blue", "gold and"]
MAX_TOKENS = 8
CLIENTS = 64
PORTS = range(18400, 18500)


def _free_port() -> int:
    for port in random.Random(os.getpid()).sample(PORTS, len(PORTS)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 18400-18499")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server process with adapters a, b, c (and 'hot' under the adapters root, not loaded)."""
    root = tmp_path_factory.mktemp("soak")
    folder = toy_model_folder(root / "model")
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    model = load_causal_lm(folder)
    for seed, name in enumerate([*ADAPTERS, "hot"]):
        lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TOY_TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
        lorakit.save_adapter(model, root / "adapters" / name, name)
    port = _free_port()
    command = [sys.executable, "-m", "lorakit", "serve", "--model", str(folder), "--served-model-name", "toy",
               *[f"--adapter={n}={root / 'adapters' / n}" for n in ADAPTERS], "--adapters-root", str(root / "adapters"),
               "--port", str(port), "--max-batch", "16", "--max-prompt-tokens", "48", "--max-tokens", "24",
               "--max-body-bytes", "4000"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LORAKIT_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Soak:
    """The clients' shared record: answers by kind, ids seen, and every broken promise."""

    def __init__(self, url: str, expected: dict):
        self.url, self.expected = url, expected
        self.lock = threading.Lock()
        self.kinds: Counter[str] = Counter()
        self.ids: set[str] = set()
        self.problems: list[str] = []

    def note(self, kind: str, problem: str | None = None, reply_id: str | None = None) -> None:
        with self.lock:
            self.kinds[kind] += 1
            if reply_id is not None:
                if reply_id in self.ids:
                    self.problems.append(f"{kind}: id {reply_id} answered twice")
                self.ids.add(reply_id)
            if problem:
                self.problems.append(f"{kind}: {problem}")

    # ----------------------------------------------------------------- one request of each kind
    def completion(self, client: httpx.Client, rng: random.Random, model: str | None = None) -> None:
        model = model or rng.choice(MODELS)
        prompt = rng.choice(PROMPTS)
        reply = client.post("/v1/completions", json=_body(model, prompt))
        if model == "hot" and reply.status_code == 404:  # unloaded at this moment: a valid answer
            return self.error("hot-unloaded", reply, 404)
        if reply.status_code != 200:
            return self.note("completion", f"{model}: status {reply.status_code} {reply.text[:200]}")
        body = reply.json()
        text = body["choices"][0]["text"]
        wrong = None if text == self.expected[(model, prompt)] else f"{model} {prompt!r}: {text!r}"
        self.note("completion" if model != "hot" else "hot-completion", wrong, body["id"])

    def chat(self, client: httpx.Client, rng: random.Random) -> None:
        model = rng.choice(MODELS)
        reply = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "say red"}], "max_tokens": MAX_TOKENS,
            "temperature": 0})
        if reply.status_code != 200:
            return self.note("chat", f"status {reply.status_code} {reply.text[:200]}")
        body = reply.json()
        text = body["choices"][0]["message"]["content"]
        self.note("chat", None if text == self.expected[(model, "chat")] else f"{model}: {text!r}", body["id"])

    def stream(self, client: httpx.Client, rng: random.Random, drop: bool) -> None:
        model, prompt = rng.choice(MODELS), rng.choice(PROMPTS)
        with client.stream("POST", "/v1/completions", json=_body(model, prompt, stream=True)) as reply:
            if reply.status_code != 200:
                return self.note("stream", f"status {reply.status_code}")
            events = []
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if drop:  # the client goes away after the first piece
                        return self.note("stream-dropped")
        if events[-1:] != ["[DONE]"] or events.count("[DONE]") != 1:
            return self.note("stream", f"ends {events[-2:]}")
        pieces = [json.loads(e) for e in events[:-1]]
        if any("error" in p for p in pieces):
            return self.note("stream", f"error event {pieces}")
        text = "".join(p["choices"][0]["text"] for p in pieces)
        ids = {p["id"] for p in pieces}
        finished = [p for p in pieces if p["choices"][0]["finish_reason"] is not None]
        wrong = None
        if len(ids) != 1 or len(finished) != 1:
            wrong = f"ids {ids}, {len(finished)} finish reasons"
        elif text != self.expected[(model, prompt)]:
            wrong = f"{model} {prompt!r}: {text!r}"
        self.note("stream", wrong, ids.pop() if len(ids) == 1 else None)

    def bad(self, client: httpx.Client, rng: random.Random) -> None:
        kind, request, status = rng.choice(BAD_REQUESTS)
        self.error(kind, client.request(**request), status)

    def error(self, kind: str, reply: httpx.Response, status: int) -> None:
        try:
            error = reply.json()["error"]
            shaped = (isinstance(error["message"], str) and isinstance(error["type"], str)
                      and "param" in error and "code" in error)
        except (ValueError, KeyError, TypeError):
            shaped = False
        wrong = None
        if reply.status_code != status:
            wrong = f"status {reply.status_code}, expected {status}: {reply.text[:200]}"
        elif not shaped:
            wrong = f"not OpenAI's error shape: {reply.text[:200]}"
        self.note(f"error:{kind}", wrong)


def _body(model: str, prompt: str, stream: bool = False, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream, **extra}


JSON = {"Content-Type": "application/json"}
BAD_REQUESTS = [
    ("malformed-json", {"method": "POST", "url": "/v1/completions", "content": b'{"model": "a", "prompt": ',
                        "headers": JSON}, 400),
    ("not-utf8", {"method": "POST", "url": "/v1/completions", "content": b"\xff\xfe\x00", "headers": JSON}, 400),
    ("not-an-object", {"method": "POST", "url": "/v1/chat/completions", "content": b"[1, 2]", "headers": JSON}, 400),
    ("oversized-prompt", {"method": "POST", "url": "/v1/completions", "json": _body("a", "say red " * 60)}, 400),
    ("oversized-body", {"method": "POST", "url": "/v1/completions", "json": _body("b", "x" * 5000)}, 413),
    ("unknown-model", {"method": "POST", "url": "/v1/completions", "json": _body("nope", "say red")}, 404),
    ("mistyped-field", {"method": "POST", "url": "/v1/completions", "json": _body("a", "say red", max_tokens="8")},
     400),
    ("bad-messages", {"method": "POST", "url": "/v1/chat/completions",
                      "json": {"model": "a", "messages": [{"role": "user", "content": 3}]}}, 400),
    ("wrong-key", {"method": "POST", "url": "/v1/completions", "json": _body("a", "say red"),
                   "headers": {"Authorization": "Bearer wrong"}}, 401),
    ("wrong-route", {"method": "GET", "url": "/v1/nothing"}, 404),
]


def _client(url: str, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _greedy(url: str, models: list[str]) -> dict:
    """The greedy answer to every (model, prompt) and (model, 'chat'), asked one at a time."""
    with _client(url) as client:
        out = {}
        for model in models:
            for prompt in PROMPTS:
                reply = client.post("/v1/completions", json=_body(model, prompt))
                assert reply.status_code == 200, reply.text
                out[(model, prompt)] = reply.json()["choices"][0]["text"]
            reply = client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "say red"}], "max_tokens": MAX_TOKENS,
                "temperature": 0})
            out[(model, "chat")] = reply.json()["choices"][0]["message"]["content"]
    return out


def _hot_reference(url: str) -> dict:
    with _client(url) as client:
        assert client.post("/v1/adapters", json={"name": "hot", "path": "hot"}).status_code == 200
        out = {k: v for k, v in _greedy(url, ["hot"]).items()}
        assert client.delete("/v1/adapters/hot").status_code == 200
    return out


def _clients(soak: Soak, seconds: float, seed: int) -> None:
    """CLIENTS threads mixing every kind of request, and one thread loading and unloading 'hot'."""
    stop = time.monotonic() + seconds

    def client_loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with _client(soak.url) as client:
            while time.monotonic() < stop:
                roll = rng.random()
                try:
                    if roll < 0.30:
                        soak.completion(client, rng)
                    elif roll < 0.40:
                        soak.chat(client, rng)
                    elif roll < 0.55:
                        soak.stream(client, rng, drop=False)
                    elif roll < 0.65:
                        soak.stream(client, rng, drop=True)
                    elif roll < 0.70:
                        soak.completion(client, rng, model="hot")
                    else:
                        soak.bad(client, rng)
                except httpx.HTTPError as err:  # a request without an answer: lost
                    soak.note("lost", f"{type(err).__name__}: {err}")

    def hot_loop() -> None:
        with _client(soak.url) as client:
            while time.monotonic() < stop:
                for method, path, body in [("POST", "/v1/adapters", {"name": "hot", "path": "hot"}),
                                           ("DELETE", "/v1/adapters/hot", None)]:
                    reply = client.request(method, path, json=body)
                    soak.note(f"hot-{method.lower()}", None if reply.status_code == 200 else reply.text[:200])
                    time.sleep(0.5)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=hot_loop))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_soak(server):
    proc, url = server
    seconds = float(os.environ.get("LORAKIT_SOAK_SECONDS", "30"))
    started = _greedy(url, MODELS)
    expected = {**started, **_hot_reference(url)}
    warm = Soak(url, expected)
    _clients(warm, min(10.0, seconds / 3), seed=1)  # warm-up: the same mix, so buffers reach their working size
    assert not warm.problems, warm.problems[:5]
    time.sleep(2)
    rss_warm = _rss_kib(proc.pid)

    soak = Soak(url, expected)
    began = time.monotonic()
    _clients(soak, seconds, seed=2)
    elapsed = time.monotonic() - began
    time.sleep(2)  # let dropped streams' rows leave the batch
    rss_end = _rss_kib(proc.pid)
    unchanged = _greedy(url, MODELS) == started
    figures = {
        "seconds": round(elapsed, 1), "clients": CLIENTS, "requests": sum(soak.kinds.values()),
        "by_kind": dict(sorted(soak.kinds.items())), "rss_after_warmup_mib": round(rss_warm / 1024, 1),
        "rss_at_end_mib": round(rss_end / 1024, 1), "rss_change": round(rss_end / rss_warm - 1, 4),
        "outputs_unchanged": unchanged, "problems": soak.problems[:20],
    }
    print(json.dumps(figures, indent=1))
    if os.environ.get("LORAKIT_SOAK_REPORT"):
        Path(os.environ["LORAKIT_SOAK_REPORT"]).write_text(json.dumps(figures, indent=1) + "\n")
    assert not soak.problems, soak.problems[:10]
    assert soak.kinds["completion"] and soak.kinds["stream"] and soak.kinds["stream-dropped"]
    assert soak.kinds["hot-post"] >= 2 and all(k in soak.kinds for k in ("error:malformed-json", "error:wrong-key"))
    assert rss_end <= 1.10 * rss_warm, figures
    assert unchanged
    assert proc.poll() is None, "the server stopped"
