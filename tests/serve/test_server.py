"""The real server on a loopback port, driven by the official `openai` client (and httpx for raw HTTP)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

import lorakit
from conftest import TOY_TARGETS, perturb, toy_model_folder
from lorakit.infer.generate import GenerationConfig, generate
from lorakit.lora.int8_factors import int8_rows
from lorakit.models import load_causal_lm, load_tokenizer
from lorakit.serve.app import build_app
from lorakit.serve.config import ServeConfig

KEY = "test-key"
NAMES = ["a", "b", "c", "d"]
PROMPTS = ["say red", "say green", "### Instruction:\nsay blue", "gold and", "say pink pink", "white"]
CHAT = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy model folder with a chat template, and five saved adapters under an adapters root."""
    root = tmp_path_factory.mktemp("serve")
    folder = toy_model_folder(root / "model")
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    model = load_causal_lm(folder)
    for seed, name in enumerate([*NAMES, "late"]):
        lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TOY_TARGETS), name)
        perturb(model, name, std=0.3, seed=seed)
        lorakit.save_adapter(model, root / "adapters" / name, name)
    head = lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    lorakit.save_adapter(lorakit.inject(load_causal_lm(folder), head), root / "adapters" / "headed")
    return folder, root / "adapters"


class Server:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(toy):
    folder, adapters = toy
    config = ServeConfig(
        api_key=KEY,
        adapters_root=str(adapters),
        max_batch=16,
        batch_wait_ms=100,
        max_prompt_tokens=60,
        max_tokens=40,
        max_body_bytes=4000,
        served_model_name="toy",
    )
    app = build_app(str(folder), {n: str(adapters / n) for n in NAMES}, config)
    with Server(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(toy):
    """reference(adapter, prompt, max_tokens): transformers' generate alone on the merged model."""
    folder, adapters = toy
    tokenizer, models = load_tokenizer(folder), {}

    def run(adapter, prompt, max_tokens, special_tokens=True):
        if adapter not in models:
            model = load_causal_lm(folder)
            if adapter is not None:
                lorakit.load_adapter(model, adapters / adapter)
                lorakit.merge_and_unload(model)
            models[adapter] = model
        config = GenerationConfig(max_new_tokens=max_tokens, add_special_tokens=special_tokens)
        return generate(models[adapter], tokenizer, [prompt], config)[0]

    return run


def test_models_and_completions_by_adapter(client, reference):
    assert [m.id for m in client.models.list().data] == ["toy", *NAMES]
    for model in ["toy", "b"]:
        got = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0)
        assert got.choices[0].text.strip() == reference(None if model == "toy" else model, PROMPTS[0], 10)
        assert got.model == model and got.usage.completion_tokens <= 10


def test_chat_and_streaming(client, reference):
    messages = [{"role": "user", "content": "say red"}]
    whole = client.chat.completions.create(model="a", messages=messages, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    rendered = "### user:\nsay red\n\n### assistant:\n"
    assert text.strip() == reference("a", rendered, 12, special_tokens=False)
    pieces = list(
        client.chat.completions.create(
            model="a", messages=messages, max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == text
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    streamed = client.completions.create(
        model="c", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in streamed).strip() == reference("c", PROMPTS[1], 8)


def test_chat_endpoint_equals_lorakit_generate_chat(client, toy, tmp_path):
    """The same multi-turn conversations through /v1/chat/completions and `lorakit generate --chat`."""
    from lorakit.cli import main

    folder, adapters = toy
    conversations = [
        [{"role": "user", "content": "say red"}],
        [{"role": "user", "content": "say red"}, {"role": "assistant", "content": "red red"},
         {"role": "user", "content": "say blue"}],
        [{"role": "system", "content": "white"}, {"role": "user", "content": "gold"}],
    ]
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations), encoding="utf-8")
    out = tmp_path / "replies.jsonl"
    argv = ["generate", "--model", str(folder), "--adapter", str(adapters / "a"), "--chat", "--input", str(path),
            "--output", str(out), "--max-new-tokens", "12"]
    assert main(argv) == 0
    generated = [json.loads(line)["output"] for line in out.read_text(encoding="utf-8").splitlines()]
    served = [client.chat.completions.create(model="a", messages=m, max_tokens=12, temperature=0).choices[0]
              .message.content.strip() for m in conversations]
    assert generated == served and any(generated)


def test_sixteen_concurrent_requests_over_four_adapters(server, client, reference):
    plan = [(NAMES[i % 4], PROMPTS[i % len(PROMPTS)], 6 + i % 5) for i in range(16)]

    def ask(item):
        adapter, prompt, max_tokens = item
        return client.completions.create(model=adapter, prompt=prompt, max_tokens=max_tokens, temperature=0)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, plan))
    for (adapter, prompt, max_tokens), got in zip(plan, replies):
        assert got.choices[0].text.strip() == reference(adapter, prompt, max_tokens), (adapter, prompt)
    assert server.app.state.scheduler.largest_batch > 4  # they did share batches


def test_hot_load_and_unload(server, client, reference, toy, tmp_path):
    manage = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert manage.post("/adapters", json={"name": "late", "path": "late"}).status_code == 200
    got = client.completions.create(model="late", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert got.choices[0].text.strip() == reference("late", PROMPTS[2], 8)
    assert "late" in [m.id for m in client.models.list().data]
    assert manage.post("/adapters", json={"name": "late", "path": "late"}).status_code == 409
    assert manage.delete("/adapters/late").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=PROMPTS[2], max_tokens=8)
    assert manage.delete("/adapters/late").status_code == 404
    # Paths must stay inside the adapters root, symlinks resolved.
    outside = toy[1].parent / "model"
    (toy[1] / "sneaky").symlink_to(outside, target_is_directory=True)
    for path in ["../model", str(outside), "sneaky", "missing", "headed"]:
        reply = manage.post("/adapters", json={"name": "x", "path": path})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "path", path
    assert manage.post("/adapters", json={"name": "../x", "path": "a"}).status_code == 400
    for headers in [{}, {"Authorization": "Bearer wrong"}]:
        reply = httpx.post(f"{server.url}/adapters", json={"name": "late", "path": "late"}, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        assert httpx.delete(f"{server.url}/adapters/a", headers=headers).status_code == 401


def test_error_paths(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="say red", max_tokens=4)
    bad = [
        {"prompt": "say red", "max_tokens": 41},  # over --max-tokens
        {"prompt": "say red " * 40, "max_tokens": 4},  # over --max-prompt-tokens
        {"prompt": "say red", "max_tokens": 4, "n": 2},
        {"prompt": "say red", "max_tokens": 4, "temperature": 5},
    ]
    for fields in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="a", **fields)
        assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as err:  # over --max-body-bytes
        client.completions.create(model="a", prompt="x" * 5000, max_tokens=4)
    assert err.value.status_code == 413 and err.value.body["code"] == "body_too_large"
    # Fields lorakit cannot honour are named, never ignored; a seed a generator cannot take is named too.
    for fields, param in [({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"),
                          ({"stop": False}, "stop"), ({"stop": 0}, "stop"), ({"seed": 2**70}, "seed"),
                          ({"seed": -1}, "seed"), ({"presence_penalty": 1.0}, "presence_penalty"),
                          ({"stream_options": {"include_usage": "yes"}}, "stream_options")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="a", prompt="say red", max_tokens=4, extra_body=fields)
        assert err.value.body["param"] == param, fields
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="a", messages=[{"role": "wizard", "content": "hi"}], max_tokens=4)
    assert err.value.body["param"] == "messages"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in [b'{"model": "a", "prompt": ', b"\xff\xfe", b"[1, 2]", b"[" * 1900 + b"]" * 1900,
                 b'{"model": "a", "prompt": "\\ud800", "max_tokens": 2}', b'{"model": "\\ud800", "prompt": "hi"}']:
        reply = httpx.post(f"{server.url}/completions", content=body, headers=headers)
        assert reply.status_code == 400 and reply.json()["error"]["code"] in ("invalid_json", None), body[:40]
    reply = httpx.get(f"{server.url}/completions", headers=headers)
    assert reply.status_code == 405 and reply.json()["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model="a", prompt="say red", max_tokens=3, temperature=0).choices


def test_client_disconnecting_mid_stream(server, client):
    body = {"model": "b", "prompt": "say red", "max_tokens": 40, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/completions", json=body, headers=headers, timeout=60) as reply:
        first = next(line for line in reply.iter_lines() if line.startswith("data: "))
        assert "choices" in json.loads(first[6:])
    # The client is gone: its row leaves the batch early, and the server goes on serving.
    got = client.completions.create(model="b", prompt="say red", max_tokens=5, temperature=0)
    assert got.choices[0].finish_reason in ("stop", "length")
    assert server.app.state.scheduler.cancelled == 1


@pytest.mark.parametrize("weights", [{"half_weights": "bf16"}, {"quantize": "int8"}, {"quantize": "w8a8"},
                                     {"lora_dtype": "bf16"}, {"lora_dtype": "int8"}],
                         ids=["bf16", "int8", "w8a8", "lora-bf16", "lora-int8"])
def test_a_server_on_half_or_int8_weights_answers_each_request_as_it_would_alone(toy, weights):
    """bf16 or int8 linear weights, or adapters rounded to bf16 or int8: a concurrent mixed batch gives each request
    what the same server gives it alone."""
    folder, adapters = toy
    config = ServeConfig(max_batch=16, batch_wait_ms=100, max_tokens=40, **weights)
    app = build_app(str(folder), {n: str(adapters / n) for n in NAMES}, config)
    factors = {n: p for n, p in app.state.registry.model.named_parameters() if ".adapters." in n}
    if weights.get("lora_dtype") == "bf16":  # every adapter the server loaded holds bf16 values
        assert factors and all(torch.equal(p, p.bfloat16().float()) for p in factors.values())
    if weights.get("lora_dtype") == "int8":  # each rank of each: int8 values times a power of two
        ranks = [p if n.endswith(".A") else p.t() for n, p in factors.items()]
        assert ranks and all(int8_rows(r, torch.ones(len(r))) is not None for r in ranks)
    plan = [(NAMES[i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(8)]
    with Server(app) as running:
        client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)

        def ask(item):
            adapter, prompt = item
            return client.completions.create(model=adapter, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

        alone = [ask(item) for item in plan]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, plan))
    assert together == alone
    assert len(set(alone)) > 1  # the adapters answer differently


def test_an_adapter_that_is_unsafe_to_serve_is_refused_and_leaves_the_base_and_the_name_as_they_were(
        server, client, reference, toy):
    """Non-finite weights, a weight of the shared base, a config that fails half-way, a file linked from outside
    the root: each a 400 naming the path; the base answers as before and the name loads a good adapter after."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = toy[1]
    for name in ["nan", "basepatch", "badsave", "linked"]:
        shutil.copytree(root / "late", root / name, dirs_exist_ok=True)
    tensors = load_file(root / "nan" / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()},
              root / "nan" / "adapter_model.safetensors")
    norm = next(p for n, p in load_causal_lm(toy[0]).named_parameters()
                if n.endswith("norm.weight") and "layers" not in n)
    save_file({**tensors, "base_model.model.model.norm.weight": torch.zeros_like(norm)},
              root / "basepatch" / "adapter_model.safetensors")
    config = json.loads((root / "badsave" / "adapter_config.json").read_text())
    (root / "badsave" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["no_head"]}))
    outside = root.parent / "outside.safetensors"
    shutil.copy(root / "late" / "adapter_model.safetensors", outside)
    (root / "linked" / "adapter_model.safetensors").unlink()
    (root / "linked" / "adapter_model.safetensors").symlink_to(outside)

    manage = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    for path, why in [("nan", "NaN or infinite"), ("basepatch", "is not a LoRA weight"),
                      ("badsave", "trains whole modules too"), ("linked", "links outside the adapters root")]:
        for _ in range(2):  # the same again: nothing of the first try is left to block the name
            reply = manage.post("/adapters", json={"name": "unsafe", "path": path})
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "path", reply.text
            assert why in reply.json()["error"]["message"], reply.text
    got = client.completions.create(model="toy", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert got.choices[0].text.strip() == reference(None, PROMPTS[1], 8)
    assert manage.post("/adapters", json={"name": "unsafe", "path": "late"}).status_code == 200
    assert manage.delete("/adapters/unsafe").status_code == 200


def test_a_non_streamed_request_whose_client_left_never_runs(server, monkeypatch):
    """The handler of a non-streamed request notices its client has gone (as a stream's does) and cancels it: held
    back by the model lock meanwhile, the request is dropped, never prefilled."""
    import lorakit.serve.app as app_module

    monkeypatch.setattr(app_module, "DISCONNECT_POLL_S", 0.05)
    scheduler, registry = server.app.state.scheduler, server.app.state.registry
    body = {"model": "b", "prompt": "say red", "max_tokens": 40, "temperature": 0}
    with registry.lock:  # the worker's next turn waits here
        before = scheduler.batches
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while scheduler.waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert not scheduler.waiting and scheduler.batches == before


def test_a_stream_can_end_with_its_usage(client):
    chunks = list(client.completions.create(model="a", prompt="say red", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and 1 <= last.usage.completion_tokens <= 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens > 0


def test_openai_details_seeds_content_parts_and_errors(server, client):
    """Without a seed each request samples afresh (a seed repeats); text content parts are joined as vLLM joins
    them, other parts named; stream_options and logprobs 0 are refused, not ignored; errors take OpenAI's shape."""
    ask = {"model": "a", "prompt": "say", "max_tokens": 12, "temperature": 1.0}
    unseeded = {client.completions.create(**ask).choices[0].text for _ in range(4)}
    seeded = {client.completions.create(**ask, seed=7).choices[0].text for _ in range(2)}
    assert len(unseeded) > 1 and len(seeded) == 1
    parts = [{"type": "text", "text": "say"}, {"type": "text", "text": "red"}]
    as_parts = client.chat.completions.create(model="a", messages=[{"role": "user", "content": parts}], max_tokens=8,
                                              temperature=0)
    as_text = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "say\nred"}],
                                             max_tokens=8, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    image = [*parts, {"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError, match=r"'messages\[0\].content\[2\]' is a 'image_url' part"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": image}], max_tokens=4)
    for fields, param in [({"stream_options": {"include_usage": True}}, "stream_options"),
                          ({"logprobs": 0}, "logprobs")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="a", prompt="say red", max_tokens=4, extra_body=fields)
        assert err.value.body["param"] == param, fields
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="say red", max_tokens=4)
    assert (err.value.body["type"], err.value.body["code"]) == ("invalid_request_error", "model_not_found")
    with pytest.raises(openai.BadRequestError, match=r"'max_tokens' must be an integer \(got a string\)"):
        client.completions.create(model="a", prompt="say red", extra_body={"max_tokens": "4"})
    chunks = list(client.completions.create(model="a", prompt="say red", max_tokens=20, stream=True, temperature=0))
    assert len({c.created for c in chunks}) == 1 and len({c.id for c in chunks}) == 1


def test_a_default_max_tokens_is_cut_to_the_room_the_prompt_leaves(toy):
    from lorakit.serve.inputs import Inputs
    from lorakit.serve.protocol import ApiError, parse_ask

    folder, _ = toy
    tokenizer = load_tokenizer(folder)
    inputs = Inputs(ServeConfig(max_kv_tokens=30, max_tokens=40), tokenizer, context=128)
    body = {"model": "toy", "messages": [{"role": "user", "content": "say red"}]}
    ask = parse_ask(body, True, inputs.config, lambda messages: "### user:\nsay red\n\n### assistant:\n")
    (ids,) = inputs.tokenize(ask)
    assert ask.max_tokens == 30 - len(ids)  # not a refusal naming a max_tokens the client never sent
    given = parse_ask({**body, "max_tokens": 30}, True, inputs.config, lambda messages: "say red")
    over = r"\+ max_tokens \(30\) is over the server's --max-kv-tokens of 30 tokens"
    with pytest.raises(ApiError, match=over) as err:
        inputs.tokenize(given)
    assert err.value.code == "context_length_exceeded"


def test_a_stream_that_fails_ends_with_done():
    import asyncio

    from lorakit.serve.app import stream
    from lorakit.serve.protocol import parse_ask
    from lorakit.serve.scheduler import Job

    async def run():
        job = Job(request=None, loop=asyncio.get_running_loop())
        job.events.put_nowait(("error", (404, "adapter 'd' was unloaded before the request ran")))
        ask = parse_ask({"model": "d", "prompt": "hi", "max_tokens": 2, "stream": True}, False, ServeConfig(), None)
        return [piece async for piece in stream(ask, "cmpl-1", [job])]

    pieces = asyncio.run(run())
    assert json.loads(pieces[0][6:])["error"]["message"].startswith("adapter 'd' was unloaded")
    assert pieces[-1] == "data: [DONE]\n\n"
