"""A chat-trained adapter served through /v1/chat/completions gives what `lorakit generate --chat` gives.

    python bench/chat_serve_check.py [--adapter runs/ros2-chat/adapter] [--data runs/ros2-data/chat_test.jsonl]
                                     [--model smollm2-135m-instruct] [--max-new-tokens 72] [--concurrency 16]
                                     [--limit N]

Every assistant turn of every test conversation becomes one request: the conversation up to that
turn's user message, with the reference replies as the history. The same requests go
  1. through the CLI: `lorakit generate --chat --input TURNS.jsonl` (greedy), one process;
  2. through the server: `lorakit serve` on loopback (continuous batching, the adapter by name) and
     the `openai` client's chat.completions (temperature 0), --concurrency requests in flight, so
     rows join and leave running batches as they would under traffic.
Prints how many replies are the same text, and each path's per-turn exact match (the ROS 2 task's
scorer). Where the two replies differ, the model (with the adapter, one row, no padding) is run on
the prompt and their common tokens, and the logit gap between the two tokens they part at is
printed beside the gap between the first and second logit over every token of the CLI's replies:
a gap far below that spread is a near-tie that another summation order can flip. Writes
runs/bench/chat_serve_check.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from results import machine, write_result

from lorakit.data.files import load_records
from lorakit.data.chat import to_messages
from lorakit.tasks import ros2


def turn_requests(records: list[dict]) -> list[dict]:
    """One {"messages": history + [reference reply]} per assistant turn (generate --chat leaves the last out)."""
    out = []
    for record in records:
        messages = to_messages(record)
        turn = 0
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                turn += 1
                out.append({"messages": messages[: i + 1], "turn": turn})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_cli(args, requests: list[dict], work: Path) -> list[str]:
    src, dst = work / "turns.jsonl", work / "generated.jsonl"
    src.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in requests), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "lorakit", "generate", "--model", args.model, "--adapter", args.adapter,
                    "--chat", "--input", str(src), "--output", str(dst), "--max-new-tokens", str(args.max_new_tokens),
                    "--batch-size", "50"], check=True)
    return [json.loads(line)["output"] for line in dst.read_text(encoding="utf-8").splitlines()]


def through_server(args, requests: list[dict]) -> list[str]:
    from openai import OpenAI

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", args.model,
                               "--adapter", f"ros2={args.adapter}", "--port", str(port)])
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        deadline = time.time() + 300
        while True:
            try:
                client.models.list()
                break
            except Exception:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("lorakit serve did not start") from None
                time.sleep(1)

        def ask(request: dict) -> str:
            reply = client.chat.completions.create(model="ros2", messages=request["messages"][:-1], temperature=0,
                                                   max_tokens=args.max_new_tokens)
            return reply.choices[0].message.content

        with ThreadPoolExecutor(args.concurrency) as pool:
            return list(pool.map(ask, requests))
    finally:
        server.terminate()
        server.wait(timeout=60)


@torch.no_grad()
def parting_gaps(args, requests: list[dict], cli: list[str], served: list[str]) -> tuple[list[dict], list[float]]:
    """For each differing pair: the logit gap between the two tokens where they part, at batch 1.
    Also the top-1 minus top-2 logit gap at every token of every CLI reply (teacher-forced), for scale."""
    from lorakit.data.chat import prompt_ids
    from lorakit.infer.load import load_for_inference

    model, tokenizer, _, _ = load_for_inference(args.model, args.adapter)
    model.eval()
    end = tokenizer.eos_token_id  # the end-of-turn token of chat models (SmolLM2: <|im_end|>)
    parted, spread = [], []
    for request, a, b in zip(requests, cli, served):
        prompt = prompt_ids(tokenizer, request["messages"][:-1])
        ta, tb = ([*tokenizer(t, add_special_tokens=False)["input_ids"], end] for t in (a, b))
        logits = model(torch.tensor([prompt + ta])).logits[0, len(prompt) - 1 : -1].float()
        top2 = logits.topk(2, dim=-1).values
        spread += (top2[:, 0] - top2[:, 1]).tolist()
        if a == b:
            continue
        j = next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y)
        gap = (logits[j, ta[j]] - logits[j, tb[j]]).item()
        parted.append({"generate": a, "serve": b, "token": j, "gap": gap,
                       "tokens": [tokenizer.decode([ta[j]]), tokenizer.decode([tb[j]])]})
    return parted, spread


def per_turn(preds: list[str], requests: list[dict]) -> dict:
    refs = [r["messages"][-1]["content"] for r in requests]
    out = {"exact_match": ros2.score(preds, refs)["exact_match"]}
    for k in sorted({r["turn"] for r in requests}):
        idx = [i for i, r in enumerate(requests) if r["turn"] == k]
        out[f"exact_match_turn{k}"] = ros2.score([preds[i] for i in idx], [refs[i] for i in idx])["exact_match"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", default="runs/ros2-chat/adapter")
    parser.add_argument("--data", default="runs/ros2-data/chat_test.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="only the first N conversations")
    parser.add_argument("--results-dir", default=None, help="where chat_serve_check.json goes (default runs/bench)")
    args = parser.parse_args()
    requests = turn_requests(load_records(args.data)[: args.limit])
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cli = through_cli(args, requests, Path(tmp))
        cli_s = time.perf_counter() - started
    started = time.perf_counter()
    served = through_server(args, requests)
    served_s = time.perf_counter() - started
    same = sum(a == b for a, b in zip(cli, served))
    rows = [
        {"path": "lorakit generate --chat", "requests": len(requests), "seconds": round(cli_s, 1),
         **per_turn(cli, requests)},
        {"path": "lorakit serve, openai client", "requests": len(requests), "seconds": round(served_s, 1),
         **per_turn(served, requests)},
    ]
    differing = [json.dumps({"last user message": r["messages"][-2]["content"], "generate": a, "serve": b})
                 for r, a, b in zip(requests, cli, served) if a != b]
    for row in rows:
        print(json.dumps(row))
    print(f"same reply through both paths: {same}/{len(requests)}")
    parted, spread = parting_gaps(args, requests, cli, served)
    spread.sort()
    scale = (f"top-1 minus top-2 logit over the {len(spread)} tokens of the CLI's replies: median "
             f"{statistics.median(spread):.2f}, 1st percentile {spread[len(spread) // 100]:.3f}")
    print(scale)
    for p in parted:
        print(f"  parts at token {p['token']} ({p['tokens'][0]!r} / {p['tokens'][1]!r}): logit gap {p['gap']:.4f}")
    columns = [("path", "path"), ("requests", "requests"), ("exact_match", "per-turn exact match")]
    columns += [(k, k.replace("exact_match_", "")) for k in rows[0] if k.startswith("exact_match_turn")]
    columns += [("seconds", "s")]
    write_result(
        "chat_serve_check", "A chat adapter through lorakit serve and lorakit generate --chat",
        rows, columns=columns, machine_info=machine(), out_dir=args.results_dir,
        description=(f"{args.adapter} on {args.model}: every assistant turn of {args.data} (reference replies as the "
                     f"history), greedy, up to {args.max_new_tokens} new tokens; served with continuous batching, "
                     f"{args.concurrency} requests in flight. Same reply through both paths: {same}/{len(requests)}."),
        notes=[f"same reply through both paths: {same}/{len(requests)}",
               *(f"differs: {d}" for d in differing[:10]),
               *(f"parts at token {p['token']} ({p['tokens'][0]!r} from generate, {p['tokens'][1]!r} from serve): "
                 f"logit gap {p['gap']:.4f} at batch 1" for p in parted[:10]), scale],
    )


if __name__ == "__main__":
    main()
