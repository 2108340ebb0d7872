"""Serving under load: open-loop Poisson arrivals through the real HTTP servers, streamed by the
`openai` client; continuous batching against the per-batch scheduler, and against llama.cpp's server.

    python bench/serve_load.py [--model smollm2-135m-instruct] [--rates 0.5,1,2] [--adapters 1,4,16]
                               [--requests 16] [--max-tokens 8-32] [--rank 8] [--repeats 1]
                               [--schedulers continuous,batch] [--llama-server PATH] [--gguf f32,q8_0]
                               [--threads 2] [--half-weights auto|bf16|fp16] [--quantize int8|w8a8]
                               [--prefill-apart] [--quick] [--name NAME]

Each system is one server process on loopback, started once and kept for every run:
  lorakit-continuous   `lorakit serve --scheduler continuous` with 16 random rank-r adapters
  lorakit-batch        `lorakit serve --scheduler batch`, the same adapters
  lorakit-continuous-half  with --half-weights: `lorakit serve --scheduler continuous --half-weights X`
                       (the base's linear weights in a half type, the adapters in fp32)
  lorakit-continuous-Q      with --quantize Q (int8 or w8a8): `lorakit serve --scheduler continuous --quantize Q`
                       (the base's linear weights and head in int8, the adapters in fp32)
  lorakit-continuous[-Q]-lora-D  with --lora-dtype D (bf16 or int8): the same with `--lora-dtype D` (the
                       adapters rounded to bf16 values, read at half the bytes; or each rank to int8 values
                       times a power of two, a quarter)
  lorakit-continuous-apart  with --prefill-apart: `lorakit serve --scheduler continuous --prefill apart`
                       (joiners prefilled in a pass of their own rather than beside the rows' decode step)
  llama-f32, llama-q8_0  llama.cpp's `llama-server` (continuous batching, --parallel slots) on the
                       base with the first adapter merged, exported to GGUF by `lorakit export`
For every rate (requests/s) and adapter count K, --requests requests arrive at Poisson times (the
same arrival times, prompts and lengths for every system): prompts alternate between the ROS 2
test split and the instruct set (rasbt instruction data), max_tokens is drawn uniformly from
--max-tokens, and every request generates exactly max_tokens tokens (`ignore_eos`), so all systems
do the same work. Request i uses adapter i mod K (llama.cpp serves the one merged model whatever K).
Each request streams; measured per run: generated tok/s (all tokens over the time from the first
arrival to the last reply), time to first token and inter-token latency p50 / p99 (gaps between
streamed chunks, each chunk divided by the tokens it carried is not known, so a chunk holding
several tokens counts once), and errors. Systems take turns within every (repeat, rate, K), after an untimed
burst of 32 requests each.
The summary gives, per system and K, the highest rate whose p99 time to first token stays under
--ttft-bound seconds (a sustained rate needs enough --requests, e.g. 128, for a queue to build past a
server's capacity: with few, a run is a burst any scheduler absorbs), and ratios within each run: continuous /
batch and lorakit continuous / llama.cpp, at each rate and with each at its own highest rate under the bound.
Writes runs/bench/serve_load.json, or with --name NAME runs/bench/serve_load_NAME.json: a record kept beside
the main one (another host, a subset of the systems).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from load_servers import KEY, LLAMA_SERVER, Server, llama_servers, lorakit_servers
from results import ROOT, host_speed, machine, min_median, record_name, write_result
from serve_variants import make_adapters

from lorakit.serve.config import QUANTIZE

INSTRUCT = ROOT.parent / "shared" / "data" / "instruct" / "rasbt_instruction-data.json"
WARMUP_REQUESTS = 32  # an untimed burst each server gets before the timed runs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rates", default="0.5,1,2,4", help="arrival rates in requests/s, comma-separated")
    parser.add_argument("--adapters", default="1,4,16", help="adapter counts K, comma-separated")
    parser.add_argument("--requests", type=int, default=16, help="requests per run")
    parser.add_argument("--max-tokens", default="8-32", help="max_tokens range LOW-HIGH, drawn uniformly")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--schedulers", default="continuous,batch")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--llama-server", default=str(LLAMA_SERVER), help="llama.cpp's server binary ('' skips it)")
    parser.add_argument("--gguf", default="f32,q8_0", help="GGUF types for llama-server")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of every server")
    parser.add_argument("--ttft-bound", type=float, default=2.0, help="p99 time-to-first-token bound, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--half-weights", choices=["auto", "bf16", "fp16"], default=None,
                        help="add lorakit-continuous-half: `lorakit serve --half-weights` with this setting")
    parser.add_argument("--quantize", choices=QUANTIZE[1:], default=None,
                        help="add lorakit-continuous-Q: `lorakit serve --quantize Q`")
    parser.add_argument("--lora-dtype", choices=["bf16", "int8"], default=None,
                        help="add lorakit serve --lora-dtype DTYPE (on fp32, and on --quantize's weights)")
    parser.add_argument("--prefill-apart", action="store_true",
                        help="add lorakit-continuous-apart: `lorakit serve --prefill apart`")
    parser.add_argument("--quick", action="store_true", help="a smoke run: rates 1,4, K 1,4, 6 requests, 4-8 tokens")
    parser.add_argument("--results-dir", default=None, help="where serve_load.json goes (default runs/bench)")
    parser.add_argument("--name", default=None, type=record_name,
                        help="write serve_load_NAME.json, a record beside the main one (e.g. another host)")
    args = parser.parse_args()
    if args.quick:
        args.rates, args.adapters, args.requests, args.max_tokens, args.gguf = "1,4", "1,4", 6, "4-8", "q8_0"
    args.rate_list = [float(r) for r in args.rates.split(",")]
    args.k_list = [int(k) for k in args.adapters.split(",")]
    low, _, high = args.max_tokens.partition("-")
    args.token_range = (int(low), int(high or low))
    return args


# -- the workload ---------------------------------------------------------------------------------
def prompts(n: int, seed: int) -> list[str]:
    """n prompts, alternating ROS 2 test instructions and instruct-set instructions."""
    from lorakit.tasks.ros2 import make_split

    ros2 = [f"### Instruction:\n{r['instruction']}\n\n### Command:\n" for r in make_split("test", n, seed=seed)]
    rows = json.loads(INSTRUCT.read_text(encoding="utf-8"))
    random.Random(seed).shuffle(rows)
    instruct = [
        f"### Instruction:\n{r['instruction']}\n\n" + (f"### Input:\n{r['input']}\n\n" if r["input"] else "")
        + "### Response:\n"
        for r in rows[:n]
    ]  # fmt: skip
    return [(ros2 if i % 2 == 0 else instruct)[i // 2] for i in range(n)]


def workload(args, rate: float, seed: int) -> list[dict]:
    """--requests requests: Poisson arrival offsets at `rate`, prompt, max_tokens."""
    rng = random.Random(seed)
    texts, at, plan = prompts(args.requests, seed), 0.0, []
    for i in range(args.requests):
        plan.append({"at": at, "prompt": texts[i], "max_tokens": rng.randint(*args.token_range)})
        at += rng.expovariate(rate)
    return plan


async def one_request(client, model: str, item: dict, start: float) -> dict:
    await asyncio.sleep(max(0.0, start + item["at"] - time.perf_counter()))
    sent = time.perf_counter()
    chunks = []
    try:
        stream = await client.completions.create(
            model=model, prompt=item["prompt"], max_tokens=item["max_tokens"], temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for part in stream:
            if part.choices and part.choices[0].text:
                chunks.append(time.perf_counter())
    except Exception as err:  # noqa: BLE001 - every failure counts as an error of the run
        return {"error": f"{type(err).__name__}: {err}"[:200]}
    if not chunks:
        return {"error": "no text streamed"}
    return {"ttft": chunks[0] - sent, "gaps": [b - a for a, b in zip(chunks, chunks[1:])], "end": chunks[-1],
            "tokens": item["max_tokens"]}  # fmt: skip


async def drive(url: str, models: list[str], plan: list[dict]) -> dict:
    """Send the plan's requests at their arrival times; request i to models[i % len(models)]."""
    import httpx
    import openai

    # a connection per request: one kept open that llama-server closed while idle fails the next request sent on it
    limits = httpx.Limits(max_connections=len(plan) + 4, max_keepalive_connections=0)
    async with openai.AsyncOpenAI(
        base_url=url, api_key=KEY, max_retries=0, timeout=600, http_client=openai.DefaultAsyncHttpxClient(limits=limits)
    ) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_request(client, models[i % len(models)], item, start) for i, item in enumerate(plan))
        )
    done = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in done]
    gaps = [g for r in done for g in r["gaps"]]
    span = max((r["end"] for r in done), default=start) - start
    tokens = sum(r["tokens"] for r in done)
    return {
        "requests": len(plan), "errors": len(errors), "tokens": tokens,
        "tokens_per_s": tokens / span if span > 0 else 0.0, "seconds": span,
        "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "itl_p50": _pct(gaps, 50), "itl_p99": _pct(gaps, 99),
        "first_error": errors[0] if errors else None,
    }  # fmt: skip


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- the runs -------------------------------------------------------------------------------------
def run_all(args, servers: list[Server]) -> list[dict]:
    """Every (repeat, rate, K): each lorakit server with K adapters, then each llama server (K does not
    apply: run once per repeat and rate), all on the same arrivals, prompts and lengths."""
    # untimed, every server alike: a burst of 32 requests (prompts of many lengths, batches up to the slots), so
    # that first-time costs (oneDNN preparing each new shape, kernels' plans) do not land in the first timed rate
    warm = workload(args, rate=100.0, seed=args.seed + 99)[:WARMUP_REQUESTS]
    for server in servers:
        asyncio.run(drive(server.url, server.models, warm))
        print(f"  warmed up {server.name}", flush=True)
    runs = []
    for repeat in range(1, args.repeats + 1):
        for rate in args.rate_list:
            plan = workload(args, rate, seed=args.seed + 1000 * repeat + int(rate * 100))
            turns = [(s, k) for k in args.k_list for s in servers if s.name.startswith("lorakit")]
            turns += [(s, None) for s in servers if not s.name.startswith("lorakit")]
            for server, k in turns:
                models = server.models[:k] if k else server.models
                result = asyncio.run(drive(server.url, models, plan))
                runs.append({"repeat": repeat, "rate": rate, "system": server.name, "adapters": k or 1,
                             "merged": k is None, **result})  # fmt: skip
                r = runs[-1]
                print(f"  round {repeat}  {rate:>5.2f} req/s  {server.name:<20} K={r['adapters']:<3} "
                      f"{r['tokens_per_s']:7.1f} tok/s  TTFT p50 {_ms(r['ttft_p50'])} p99 {_ms(r['ttft_p99'])}  "
                      f"ITL p50 {_ms(r['itl_p50'])} p99 {_ms(r['itl_p99'])}  errors {r['errors']}", flush=True)  # fmt: skip
    return runs


def _ms(seconds: float | None) -> str:
    return "   -  " if seconds is None else f"{seconds * 1000:6.0f} ms"


def summarise(runs: list[dict], args) -> list[dict]:
    """Highest sustained rate per system and K; continuous / batch, lorakit / llama.cpp and each variant of lorakit's
    continuous server / its plain one tok/s ratios, for the systems that ran."""
    rows = []
    systems = list(dict.fromkeys((r["system"], r["adapters"]) for r in runs))
    by = {(r["repeat"], r["rate"], r["system"], r["adapters"]): r for r in runs}
    repeats = sorted({r["repeat"] for r in runs})
    sustained = {}  # (system, K) -> the highest rate every round kept under the TTFT bound
    for system, k in systems:
        ok = [rate for rate in args.rate_list
              if all(by[(i, rate, system, k)]["errors"] == 0 and (by[(i, rate, system, k)]["ttft_p99"] or 1e9)
                     < args.ttft_bound for i in repeats)]  # fmt: skip
        label = f"{system} K={k}" if system.startswith("lorakit") else system
        if ok:
            best = sustained[(system, k)] = max(ok)
            rates = [by[(i, best, system, k)]["tokens_per_s"] for i in repeats]
            rows.append({"what": f"{label}: tok/s at {best:g} req/s, the highest rate with p99 TTFT < "
                                 f"{args.ttft_bound:g} s", **min_median(rates)})  # fmt: skip
        else:
            rows.append({"what": f"{label}: no rate kept p99 TTFT < {args.ttft_bound:g} s"})
    pairs = [(f"lorakit-continuous K={k}", ("lorakit-continuous", k), ("lorakit-batch", k)) for k in args.k_list]
    if any(name == "lorakit-continuous-apart" for name, _ in systems):
        pairs += [(f"lorakit-continuous K={k} / lorakit-continuous-apart", ("lorakit-continuous", k),
                   ("lorakit-continuous-apart", k)) for k in args.k_list]  # fmt: skip
    ours = list(dict.fromkeys(name for name, _ in systems
                              if name.startswith("lorakit-continuous") and name != "lorakit-continuous-apart"))
    pairs += [(f"{o} K={k} / {s}", (o, k), (s, 1))
              for o in ours for k in args.k_list for s, _ in systems if s.startswith("llama")]  # fmt: skip
    # each variant of lorakit serve (quantised, half, narrow adapters) against its plain fp32 self
    pairs += [(f"{o} K={k} / lorakit-continuous", (o, k), ("lorakit-continuous", k))
              for o in ours if o != "lorakit-continuous" for k in args.k_list]  # fmt: skip
    present = set(systems)
    for label, ours, theirs in [pair for pair in pairs if pair[1] in present and pair[2] in present]:
        if "/" not in label:
            label = f"{label} / lorakit-batch"
        if ours in sustained:  # each system at its own highest rate under the bound
            bound = f"each at its highest rate with p99 TTFT < {args.ttft_bound:g} s"
            if theirs in sustained:
                ratios = [by[(i, sustained[ours], *ours)]["tokens_per_s"] / by[(i, sustained[theirs], *theirs)]
                          ["tokens_per_s"] for i in repeats]  # fmt: skip
                rows.append({"what": f"{label} tok/s, {bound}", **min_median(ratios)})
            else:
                rows.append({"what": f"{label} tok/s, {bound}: only the first kept a rate under it"})
        for rate in args.rate_list:
            keys = [((i, rate, *ours), (i, rate, *theirs)) for i in repeats]
            if all(a in by and b in by and by[b]["tokens_per_s"] > 0 for a, b in keys):
                ratios = [by[a]["tokens_per_s"] / by[b]["tokens_per_s"] for a, b in keys]
                rows.append({"what": f"{label} tok/s at {rate:g} req/s", **min_median(ratios)})
    return rows


def main() -> None:
    args = parse_args()
    speed = host_speed()
    from lorakit.serve.malloc import keep_freed_memory

    keep_freed_memory()
    servers: list[Server] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_adapters(argparse.Namespace(model=args.model, adapters=max(args.k_list), rank=args.rank), root)
        try:
            servers = lorakit_servers(args, root, names, root)
            servers += llama_servers(args, root, names, root)
            for server in servers:
                server.wait()
            runs = run_all(args, servers)
        except BaseException:
            for server in servers:
                print(f"--- {server.name} log (tail) ---\n" + Path(server.log.name).read_text()[-2000:], file=sys.stderr)
            raise
        finally:
            for server in servers:
                server.stop()
    summary = summarise(runs, args)
    print(f"\n  {'':<78} {'min':>8} {'median':>8} {'max':>8}")
    for row in summary:
        cells = "".join(f" {row[c]:>8.2f}" for c in ("min", "median", "max") if c in row)
        print(f"  {row['what']:<78}{cells}")
    low, high = args.token_range
    path = write_result(
        "serve_load" + (f"_{args.name}" if args.name else ""),
        "Serving under load: continuous batching, per-batch, llama.cpp" + (f" ({args.name})" if args.name else ""),
        runs,
        description=(
            f"{args.model}, {args.requests} streamed requests per run arriving at Poisson times at each rate "
            f"(requests/s), prompts alternating ROS 2 test instructions and the rasbt instruct set, max_tokens "
            f"uniform in {low}-{high} and every request generating exactly that many tokens (ignore_eos), greedy; "
            f"request i uses adapter i mod K of {max(args.k_list)} random rank-{args.rank} adapters. "
            "lorakit-continuous / lorakit-batch: `lorakit serve --scheduler continuous|batch "
            f"--max-batch {args.max_batch}`; "
            + (f"lorakit-continuous-half: the same with `--half-weights {args.half_weights}`; " if args.half_weights
               else "")
            + ("lorakit-continuous-apart: the same with `--prefill apart`; " if args.prefill_apart else "")
            + (f"lorakit-continuous-{args.quantize}: the same with `--quantize {args.quantize}`; " if args.quantize
               else "")
            + (f"lorakit-continuous-*lora-{args.lora_dtype}: the same with `--lora-dtype {args.lora_dtype}`; "
               if args.lora_dtype else "")
            + f"llama-*: llama.cpp's llama-server ({args.max_batch} parallel slots) on "
            "the base with adapter 0 merged, exported to GGUF by `lorakit export`. Every server uses "
            f"{args.threads} threads and runs as its own process on loopback; the client (openai, asyncio) shares "
            "the machine. TTFT: time from sending to the first streamed text; ITL: gaps between streamed chunks. "
            "Systems take turns on the same arrivals within each round; ratios are taken within a round."
        ),
        columns=[("repeat", "round"), ("rate", "req/s"), ("system", "system"), ("adapters", "K"),
                 ("tokens_per_s", "tok/s"), ("ttft_p50", "TTFT p50 s"), ("ttft_p99", "TTFT p99 s"),
                 ("itl_p50", "ITL p50 s"), ("itl_p99", "ITL p99 s"), ("errors", "errors"), ("seconds", "s")],
        summary=summary, machine_info=machine(device=f"cpu, {args.threads} threads per server", **speed),
        out_dir=args.results_dir,
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
