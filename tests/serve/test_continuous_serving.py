"""Continuous batching through the real server on loopback: requests join a running batch, stay
equal to their single-request merged outputs under load, and limits, disconnects and hot
loading and unloading keep working while the batch runs."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_server import CHAT, Server

import lorakit
from conftest import TOY_TARGETS, perturb, toy_model_folder
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.models import load_causal_lm, load_tokenizer
from lorakit.serve.app import build_app
from lorakit.serve.config import ServeConfig

KEY = "test-key"
NAMES = [f"n{i}" for i in range(8)]
PROMPTS = ["say red", "say green", "### Instruction:\nsay blue", "gold and", "say pink pink", "white", "grey"]
MAX_KV = 110  # the toy model has a context of 128


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy model folder and nine saved adapters (eight served from the start, one to load)."""
    root = tmp_path_factory.mktemp("continuous")
    folder = toy_model_folder(root / "model")
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    model = load_causal_lm(folder)
    for seed, name in enumerate([*NAMES, "late"]):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + seed % 3, lora_alpha=8, target_modules=TOY_TARGETS), name)
        perturb(model, name, std=0.3, seed=10 + seed)
        lorakit.save_adapter(model, root / "adapters" / name, name)
    return folder, root / "adapters"


def serve(toy, scheduler: str) -> Server:
    folder, adapters = toy
    config = ServeConfig(
        api_key=KEY, adapters_root=str(adapters), scheduler=scheduler, max_batch=8, max_kv_tokens=MAX_KV,
        batch_wait_ms=5, max_prompt_tokens=60, max_tokens=120, served_model_name="toy",
    )  # fmt: skip
    return Server(build_app(str(folder), {n: str(adapters / n) for n in NAMES}, config))


@pytest.fixture(scope="module")
def server(toy):
    with serve(toy, "continuous") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(toy):
    """reference(adapter, prompt, max_tokens): transformers' generate alone on the merged model."""
    folder, adapters = toy
    tokenizer, models, lock = load_tokenizer(folder), {}, threading.Lock()

    def run(adapter, prompt, max_tokens):
        with lock:
            if adapter not in models:
                model = load_causal_lm(folder)
                if adapter is not None:
                    lorakit.load_adapter(model, adapters / adapter)
                    lorakit.merge_and_unload(model)
                models[adapter] = model
            return generate(models[adapter], tokenizer, [prompt], GenerationConfig(max_new_tokens=max_tokens))[0]

    return run


def stream_times(url: str, body: dict, record: dict, key, quit_after: int | None = None, started=None) -> None:
    """POST a streamed completion; record[key] = (time of each chunk, the whole text, the finish reason).
    `started` (a threading.Event) is set at the first chunk."""
    times, text, reason = [], "", None
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/completions", json={**body, "stream": True}, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            times.append(time.monotonic())
            text, reason = text + choice["text"], choice["finish_reason"]
            if started is not None:
                started.set()
            if quit_after is not None and len(times) >= quit_after:
                break  # the client goes away mid-stream
    record[key] = (times, text, reason)


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("scheduler", ["continuous", "batch"])
def test_a_request_arriving_mid_batch_streams_before_the_batch_ends(toy, scheduler):
    """With continuous batching the late request streams while the long one decodes; with the
    per-batch scheduler (the control) it waits for the whole batch."""
    long = {"model": "n0", "prompt": PROMPTS[0], "max_tokens": 90, "temperature": 0, "ignore_eos": True}
    short = {"model": "n1", "prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    record: dict = {}
    with serve(toy, scheduler) as running:
        started = threading.Event()
        first = threading.Thread(target=stream_times, args=(running.url, long, record, "long", None, started))
        first.start()
        assert started.wait(60)  # the long request is decoding
        stream_times(running.url, short, record, "short")
        first.join()
    (long_times, _, long_reason), (short_times, _, short_reason) = record["long"], record["short"]
    assert long_reason == short_reason == "length"
    if scheduler == "continuous":
        assert short_times[-1] < long_times[-1]  # the late request finished while the long one ran
    else:
        assert short_times[0] > long_times[-1]


def test_32_requests_over_2_s_across_8_adapters_equal_merged_outputs(server, client, reference):
    rng = random.Random(0)
    plan = [(NAMES[i % 8], PROMPTS[rng.randrange(len(PROMPTS))], rng.randint(2, 20), i % 3 == 0) for i in range(32)]
    start = sorted(rng.uniform(0, 2) for _ in plan)  # arrival times
    scheduler = server.app.state.scheduler
    batches_before = scheduler.batches

    def ask(i):
        adapter, prompt, max_tokens, streamed = plan[i]
        time.sleep(max(0.0, t0 + start[i] - time.monotonic()))
        reply = client.completions.create(
            model=adapter, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=streamed
        )
        return "".join(p.choices[0].text for p in reply) if streamed else reply.choices[0].text

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    for (adapter, prompt, max_tokens, _), text in zip(plan, got):
        assert text.strip() == reference(adapter, prompt, max_tokens), (adapter, prompt, max_tokens)
    assert len(set(got)) > 8  # the adapters and prompts do differ
    assert scheduler.largest_batch > 1 and scheduler.batches - batches_before > 2  # rows joined running batches
    assert not scheduler.waiting and not scheduler.inflight and len(scheduler.batch) == 0


def test_limits_first_come_first_served(toy, server, client):
    """Rows and KV tokens stay within --max-batch and --max-kv-tokens; requests beyond wait and are
    admitted in arrival order (the order the server queued them); one that could never fit is refused."""
    scheduler, arrived, admitted, sizes = server.app.state.scheduler, [], [], []
    join, submit = scheduler.batch.join, scheduler.submit

    def recording_submit(request):
        arrived.append(request.max_tokens)
        return submit(request)

    def recording_join(requests, on_text, on_done):
        admitted.extend(r.max_tokens for r in requests)
        join(requests, on_text, on_done)
        sizes.append((len(scheduler.batch), scheduler.batch.kv_tokens()))

    scheduler.batch.join, scheduler.submit = recording_join, recording_submit
    try:
        plan = [(NAMES[i % 8], 45 + i) for i in range(6)]  # each needs ~50 KV tokens: two fit at once

        def ask(i):
            time.sleep(0.05 * i)
            adapter, max_tokens = plan[i]
            return client.completions.create(
                model=adapter, prompt=PROMPTS[i % 7], max_tokens=max_tokens, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip

        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(ask, range(6)))
    finally:
        del scheduler.batch.join, scheduler.submit
    assert sorted(arrived) == [max_tokens for _, max_tokens in plan]
    assert admitted == arrived  # first come, first served
    assert all(rows <= 8 and kv <= MAX_KV for rows, kv in sizes) and max(rows for rows, _ in sizes) == 2
    assert [r.usage.completion_tokens for r in replies] == [max_tokens for _, max_tokens in plan]
    tokenizer, words = load_tokenizer(toy[0]), "say"
    while len(tokenizer(words)["input_ids"]) <= MAX_KV - 80:
        words += " red"
    with pytest.raises(openai.BadRequestError, match="max-kv-tokens"):
        client.completions.create(model="n0", prompt=words, max_tokens=80)


def test_disconnects_under_load(server, client, reference):
    scheduler = server.app.state.scheduler
    cancelled_before, record = scheduler.cancelled, {}
    body = {"prompt": PROMPTS[2], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    threads = [
        threading.Thread(target=stream_times, args=(server.url, {**body, "model": NAMES[i]}, record, i, 3 if i % 2 else None))
        for i in range(6)
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(record[i][0]) == 3 and record[i][2] is None for i in (1, 3, 5))
    assert all(record[i][2] == "length" for i in (0, 2, 4))
    wait_for(lambda: scheduler.cancelled == cancelled_before + 3)  # the quitters' rows left the batch early
    got = client.completions.create(model="n3", prompt=PROMPTS[3], max_tokens=12, temperature=0)
    assert got.choices[0].text.strip() == reference("n3", PROMPTS[3], 12)
    assert not scheduler.inflight and len(scheduler.batch) == 0


def test_hot_load_and_unload_under_load(server, client, reference):
    manage = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    scheduler, record = server.app.state.scheduler, {}
    busy = {"model": "n5", "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    started = threading.Event()
    background = threading.Thread(target=stream_times, args=(server.url, busy, record, "busy", None, started))
    background.start()
    assert started.wait(60)
    assert manage.post("/adapters", json={"name": "late", "path": "late"}).status_code == 200  # mid-batch
    got = client.completions.create(model="late", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert got.choices[0].text.strip() == reference("late", PROMPTS[2], 8)
    # Unloading an adapter in use: refused to new requests at once, gone once its rows finish.
    user = {"model": "late", "prompt": PROMPTS[4], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    worker = threading.Thread(target=stream_times, args=(server.url, user, record, "late"))
    worker.start()
    wait_for(lambda: "late" in scheduler.registry.busy)
    assert manage.delete("/adapters/late").status_code == 200
    assert "late" not in scheduler.registry.busy  # the unload waited for the row using it
    worker.join()
    assert record["late"][2] == "length"  # and that row ran to its end with its adapter
    assert record["late"][1].lstrip().startswith(reference("late", PROMPTS[4], 30))
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=PROMPTS[2], max_tokens=8)
    background.join()
    assert record["busy"][2] == "length"  # the other rows ran through it all
    assert manage.post("/adapters", json={"name": "late", "path": "late"}).status_code == 200  # and back
    assert manage.delete("/adapters/late").status_code == 200


def test_scheduler_flags_are_checked_in_one_line(capsys):
    from lorakit.cli import main

    for flags, expected in [(["--scheduler", "fifo"], "invalid choice: 'fifo'"),
                            (["--prefill", "chunked"], "invalid choice: 'chunked'"),
                            (["--max-kv-tokens", "1"], "max_kv_tokens must be >= 2"),
                            (["--port", "70000"], "port must be <= 65535")]:  # fmt: skip
        try:
            code = main(["serve", "--model", "unused", *flags])
        except SystemExit as exit_:  # argparse's own refusal
            code = exit_.code
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1], err
