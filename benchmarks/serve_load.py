"""`tunelab serve` under load: 64 concurrent clients for 2 minutes, two adapters, mixed streaming.

Starts ``tunelab serve RUN RUN`` in a subprocess on 127.0.0.1 (loopback only), then from this
process drives it with the official ``openai`` async client: ``--clients`` clients each send
requests one after another until ``--duration-s`` is up (and at most ``--max-requests`` in all),
alternating the two runs' adapters, streaming every other request. Each request is a test-split
prompt of the run's own task, greedy, ``--max-tokens`` new tokens. Then one client alone sends
the same mix one request at a time for ``--sequential-s``: served tokens/s under load over
tokens/s one at a time is the batching gain. Reports requests/s, latency and time-to-first-token
percentiles (streamed requests), errors (must be 0), and writes a result file with provenance.

    python benchmarks/serve_load.py runs/sentiment-lora runs/ner-lora
    python benchmarks/serve_load.py RUN RUN --clients 8 --duration-s 20 --sequential-s 10  # lighter
    python benchmarks/serve_load.py RUN RUN --profile /tmp/serve.prof   # cProfile the HTTP side
    python benchmarks/serve_load.py --smoke   # seconds: two tiny runs, 2 clients for 2 s

``--smoke`` takes the whole path in seconds, for the test suite: it trains two runs of the
sentiment example on the test suite's tiny model (``benchmarks/smoke.py``, in this process),
serves them (the one subprocess), drives 2 clients for 2 s and one for 1 s with 4 new tokens,
and writes the result to a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
import smoke  # benchmarks/smoke.py, beside this script
from provenance import provenance  # benchmarks/provenance.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


@dataclass
class Outcome:
    """One request as a client saw it."""

    model: str
    stream: bool
    ok: bool
    latency_s: float
    first_token_s: float | None  # streamed requests: time to the first content delta
    completion_tokens: int
    error: str | None = None


def run_prompts(run_dir: Path) -> list[str]:
    """The run's test-split inputs, formatted with its own prompt template (as it was trained)."""
    import yaml

    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    rows = [json.loads(line) for line in Path(split_file(data)).read_text().splitlines() if line]
    return [data["prompt"].format(**row) for row in rows]


def split_file(data: dict) -> str:
    """The run's test file (else its validation, else its training file): a saved config holds
    each split as a list of absolute paths."""
    for split in ("test", "validation", "train"):
        files = [data[split]] if isinstance(data[split], str) else data[split]
        if files:
            return files[0]
    raise SystemExit("the run's config names no data files")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(runs: list[str], port: int, profile: str | None) -> subprocess.Popen:
    tunelab = [sys.executable, "-m", "tunelab.cli"]
    if profile:
        tunelab = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "tunelab.cli"]
    return subprocess.Popen([*tunelab, "serve", *runs, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_ready(client: openai.AsyncOpenAI, server: subprocess.Popen,
                     timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-3000:]}")
        try:
            return [model.id async for model in client.models.list()]
        except openai.APIConnectionError:
            await asyncio.sleep(0.5)
    raise SystemExit(f"the server did not answer within {timeout_s:.0f} s")


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, stream: bool,
                      max_tokens: int) -> Outcome:
    started = time.perf_counter()
    first = None
    try:
        if stream:
            tokens = 0
            chunks = await client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter() - started
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        else:
            response = await client.completions.create(model=model, prompt=prompt,
                                                       max_tokens=max_tokens, temperature=0)
            tokens = response.usage.completion_tokens
    except Exception as error:  # counted, reported, and the benchmark fails below
        return Outcome(model, stream, False, time.perf_counter() - started, None, 0,
                       f"{type(error).__name__}: {error}"[:300])
    return Outcome(model, stream, True, time.perf_counter() - started, first, tokens)


async def drive(client: openai.AsyncOpenAI, work: list[tuple[str, list[str]]], clients: int,
                duration_s: float, max_requests: int, max_tokens: int) -> tuple[list, float]:
    """``clients`` clients, each sending requests back to back until the time or count is up."""
    outcomes: list[Outcome] = []
    deadline = time.perf_counter() + duration_s
    sent = 0

    async def client_loop(number: int) -> None:
        nonlocal sent
        rng = random.Random(number)
        turn = number
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            model, prompts = work[turn % len(work)]
            stream = (turn // len(work)) % 2 == 1
            turn += 1
            outcomes.append(await one_request(client, model, rng.choice(prompts), stream,
                                              max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(number) for number in range(clients)))
    return outcomes, time.perf_counter() - started


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(outcomes: list[Outcome], wall_s: float) -> dict:
    done = [o for o in outcomes if o.ok]
    latencies = [o.latency_s for o in done]
    firsts = [o.first_token_s for o in done if o.first_token_s is not None]
    tokens = sum(o.completion_tokens for o in done)
    return {
        "requests": len(outcomes), "errors": len(outcomes) - len(done),
        "streamed": sum(o.stream for o in outcomes), "wall_s": round(wall_s, 2),
        "requests_per_s": round(len(done) / wall_s, 3),
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall_s, 2),
        "latency_s": {f"p{p}": round(percentile(latencies, p / 100), 3) for p in (50, 95, 99)}
        if latencies else None,
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "first_token_s": {f"p{p}": round(percentile(firsts, p / 100), 3) for p in (50, 95, 99)}
        if firsts else None,
        "error_examples": sorted({o.error for o in outcomes if o.error})[:5],
    }


async def measure(args, names: list[str], port: int, server: subprocess.Popen) -> dict:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                max_retries=0, timeout=args.duration_s + 300)
    served = await wait_ready(client, server, args.startup_timeout_s)
    missing = [name for name in names if name not in served]
    if missing:
        raise SystemExit(f"the server does not serve {missing}: {served}")
    work = [(name, run_prompts(Path(run.rpartition("=")[2])))
            for name, run in zip(names, args.runs, strict=True)]
    # warm-up: each adapter once, streamed and not, so first-call costs stay out of the figures
    for name, prompts in work:
        for stream in (False, True):
            await one_request(client, name, prompts[0], stream, args.max_tokens)
    load_average = os.getloadavg()[0]
    loaded, loaded_s = await drive(client, work, args.clients, args.duration_s,
                                   args.max_requests, args.max_tokens)
    one_by_one, one_by_one_s = await drive(client, work, 1, args.sequential_s,
                                           args.max_requests, args.max_tokens)
    await client.close()
    under_load, sequential = summary(loaded, loaded_s), summary(one_by_one, one_by_one_s)
    return {
        "workload": {"clients": args.clients, "duration_s": args.duration_s,
                     "max_requests": args.max_requests, "max_tokens": args.max_tokens,
                     "sequential_s": args.sequential_s, "models": names, "temperature": 0,
                     "endpoint": "/v1/completions", "streaming": "every other request"},
        "load_average_before_load": round(load_average, 2),
        "under_load": under_load, "one_at_a_time": sequential,
        "batching_gain": round(under_load["tokens_per_s"] / sequential["tokens_per_s"], 2)
        if sequential["tokens_per_s"] else None,
        "per_model": {name: summary([o for o in loaded if o.model == name], loaded_s)
                      for name in names},
        "outcomes": [asdict(o) for o in loaded],
    }


# --smoke: what the load is cut to
SMOKE_LOAD = {"clients": 2, "duration_s": 2.0, "sequential_s": 1.0, "max_tokens": 4,
              "max_requests": 16, "startup_timeout_s": 300.0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="two run directories trained on one base "
                        "(NAME=RUN serves a run under another name); none with --smoke")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sequential-s", type=float, default=30.0)
    parser.add_argument("--startup-timeout-s", type=float, default=600.0)
    parser.add_argument("--profile", help="run the server under cProfile, writing this file")
    parser.add_argument("--out", type=Path, help="result file (default results/serve-load.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: two tiny runs trained here, a short "
                             "light load, the result in a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke == bool(args.runs):
        parser.error("give two runs, or --smoke (which trains its own)")
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="tunelab-serve-smoke-") as scratch:
            model = smoke.tiny_model(Path(scratch) / "tiny-model")
            args.runs = [str(smoke.tiny_run(Path(scratch) / "runs", name, model))
                         for name in ("smoke-a", "smoke-b")]
            vars(args).update(SMOKE_LOAD, out=smoke.result_path(args.out, "serve-load.json"))
            return serve_and_measure(args)
    if len(args.runs) != 2:
        parser.error(f"give two runs, not {len(args.runs)}")
    serve_and_measure(args)


def serve_and_measure(args: argparse.Namespace) -> None:
    """Serve ``args.runs``, measure, write the result file; exit non-zero on any error."""
    import yaml

    names = [run.partition("=")[0] if "=" in run else
             yaml.safe_load((Path(run) / "config.yaml").read_text())["name"] for run in args.runs]
    origin = provenance()
    port = free_port()
    server = start_server(args.runs, port, args.profile)
    try:
        result = asyncio.run(measure(args, names, port, server))
    finally:
        server.send_signal(signal.SIGINT)  # graceful: a profile is written on a clean exit
        server.wait(120)
    origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {**origin, **result}
    out = args.out or RESULTS / "serve-load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    load, alone = result["under_load"], result["one_at_a_time"]
    print(json.dumps({"under_load": {k: v for k, v in load.items() if k != "error_examples"},
                      "one_at_a_time": alone["tokens_per_s"],
                      "batching_gain": result["batching_gain"]}, indent=1))
    print(f"written to {out}")
    if load["errors"] or alone["errors"]:
        raise SystemExit(f"{load['errors'] + alone['errors']} requests failed: "
                         f"{load['error_examples'] or alone['error_examples']}")


if __name__ == "__main__":
    main()
