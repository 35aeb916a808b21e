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

``--engine llama.cpp`` serves the runs with ``tunelab serve --engine llama.cpp`` (llama-server
on the base as GGUF F16 and the adapters as GGUF LoRA, behind tunelab's own API); ``--engine
both`` measures the own engine and then llama.cpp on the same runs with the same workload,
checks that their greedy answers to the same prompts (``--agreement-prompts`` per run) are
identical, prints the ratios and writes ``results/serve-engines.json``:

    python benchmarks/serve_load.py RUN RUN --engine both

``--smoke`` takes the whole path in seconds, for the test suite: it trains two runs of the
sentiment example on the test suite's tiny model (``benchmarks/smoke.py``, in this process),
serves them (the one subprocess per engine), drives 2 clients for 2 s and one for 1 s with 4 new
tokens, and writes the result to a temporary folder.
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


def start_server(runs: list[str], port: int, profile: str | None,
                 engine: str = "own") -> subprocess.Popen:
    tunelab = [sys.executable, "-m", "tunelab.cli"]
    if profile:
        tunelab = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "tunelab.cli"]
    return subprocess.Popen([*tunelab, "serve", *runs, "--host", "127.0.0.1", "--port", str(port),
                             "--engine", engine],
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
    answers = await greedy_answers(client, work, args.agreement_prompts, args.max_tokens)
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
        "greedy_answers": answers,
    }


async def greedy_answers(client: openai.AsyncOpenAI, work: list[tuple[str, list[str]]],
                         count: int, max_tokens: int) -> list[dict]:
    """The first ``count`` prompts of each run answered greedily, one at a time (for comparing
    engines: the same prompts, the same settings)."""
    answers = []
    for model, prompts in work:
        for prompt in prompts[:count]:
            response = await client.completions.create(model=model, prompt=prompt,
                                                       max_tokens=max_tokens, temperature=0)
            answers.append({"model": model, "prompt": prompt,
                            "text": response.choices[0].text,
                            "completion_tokens": response.usage.completion_tokens})
    return answers


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
    parser.add_argument("--engine", choices=ENGINES, default="own",
                        help="what generates behind tunelab serve; both: own, then llama.cpp")
    parser.add_argument("--agreement-prompts", type=int, default=16,
                        help="prompts per run answered greedily on each engine (compared)")
    parser.add_argument("--out", type=Path, help="result file (default results/serve-load.json; "
                        "--engine both: results/serve-engines.json)")
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
            vars(args).update(SMOKE_LOAD, agreement_prompts=2, out=smoke.result_path(
                args.out, RESULT_FILES[args.engine]))
            return serve_and_measure(args)
    if len(args.runs) != 2:
        parser.error(f"give two runs, not {len(args.runs)}")
    serve_and_measure(args)


ENGINES = ("own", "llama.cpp", "both")
RESULT_FILES = {"own": "serve-load.json", "llama.cpp": "serve-load-llama-cpp.json",
                "both": "serve-engines.json"}


def serve_once(args: argparse.Namespace, names: list[str], engine: str) -> dict:
    """One engine: serve ``args.runs`` on it, measure, stop the server."""
    port = free_port()
    started = time.perf_counter()
    server = start_server(args.runs, port, args.profile, engine)
    try:
        result = asyncio.run(measure(args, names, port, server))
    finally:
        server.send_signal(signal.SIGINT)  # graceful: a profile is written on a clean exit
        server.wait(120)
    result["wall_s_with_startup"] = round(time.perf_counter() - started, 1)
    return result


def compare_engines(own: dict, other: dict) -> dict:
    """Throughput and latency ratios (llama.cpp over own) and the greedy answers' agreement."""
    def ratio(a, b):
        return round(a / b, 2) if a and b else None

    mine, theirs = own["under_load"], other["under_load"]
    pairs = list(zip(own["greedy_answers"], other["greedy_answers"], strict=True))
    same = [a["text"] == b["text"] for a, b in pairs]
    return {
        "requests_per_s_ratio": ratio(theirs["requests_per_s"], mine["requests_per_s"]),
        "tokens_per_s_ratio": ratio(theirs["tokens_per_s"], mine["tokens_per_s"]),
        "p50_latency_ratio": ratio(theirs["latency_s"]["p50"], mine["latency_s"]["p50"])
        if mine["latency_s"] and theirs["latency_s"] else None,
        "one_at_a_time_tokens_per_s_ratio": ratio(other["one_at_a_time"]["tokens_per_s"],
                                                  own["one_at_a_time"]["tokens_per_s"]),
        "greedy_identical": sum(same), "greedy_compared": len(same),
        "greedy_identical_share": round(sum(same) / len(same), 3) if same else None,
        "greedy_differences": [{"model": a["model"], "prompt": a["prompt"], "own": a["text"],
                                "llama.cpp": b["text"]}
                               for (a, b), equal in zip(pairs, same, strict=True)
                               if not equal][:8],
    }


def serve_and_measure(args: argparse.Namespace) -> None:
    """Serve ``args.runs``, measure, write the result file; exit non-zero on any error."""
    import yaml

    names = [run.partition("=")[0] if "=" in run else
             yaml.safe_load((Path(run) / "config.yaml").read_text())["name"] for run in args.runs]
    origin = provenance()
    if args.engine == "both":
        import tunelab.ship.llamacpp as llamacpp

        if llamacpp.find_server() is None:
            raise SystemExit(f"--engine both needs llama-server: {llamacpp.BUILD_FIX}")
        engines = {"own": serve_once(args, names, "own"),
                   "llama.cpp": serve_once(args, names, "llama.cpp")}
        build = llamacpp.cached_build() or {}
        origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result = {**origin, "runs": run_records(args.runs, names),
                  "llama_cpp": {"server": str(llamacpp.find_server()),
                                **{k: build[k] for k in ("sdist", "llama_cpp_version",
                                                         "cmake_flags") if k in build},
                                "slots": 16, "threads": os.cpu_count(),
                                "model": "base as GGUF F16, adapters as GGUF LoRA (F32)"},
                  "engines": engines,
                  "comparison": compare_engines(engines["own"], engines["llama.cpp"])}
        return write(args, result, [(name, engines[name]) for name in engines],
                     result["comparison"])
    result = serve_once(args, names, args.engine)
    origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write(args, {**origin, "engine": args.engine, **result}, [(args.engine, result)], None)


def run_records(runs: list[str], names: list[str]) -> list[dict]:
    """What each served run is: its base, method and steps (from its saved config)."""
    import yaml

    records = []
    for name, run in zip(names, runs, strict=True):
        config = yaml.safe_load((Path(run.rpartition("=")[2]) / "config.yaml").read_text())
        records.append({"name": name, "path": run.rpartition("=")[2],
                        "base": config["model"]["path"],
                        "method": {k: config["method"].get(k) for k in ("kind", "r", "alpha")},
                        "max_steps": config["train"].get("max_steps")})
    return records


def write(args: argparse.Namespace, result: dict, measured: list[tuple[str, dict]],
          comparison: dict | None) -> None:
    out = args.out or RESULTS / RESULT_FILES[args.engine]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    failed = []
    for engine, measurement in measured:
        load, alone = measurement["under_load"], measurement["one_at_a_time"]
        print(engine, json.dumps({"under_load": {k: v for k, v in load.items()
                                                 if k != "error_examples"},
                                  "one_at_a_time": alone["tokens_per_s"],
                                  "batching_gain": measurement["batching_gain"]}, indent=1))
        if load["errors"] or alone["errors"]:
            failed.append(f"{engine}: {load['errors'] + alone['errors']} requests failed: "
                          f"{load['error_examples'] or alone['error_examples']}")
    if comparison is not None:
        print("llama.cpp / own:", json.dumps({k: v for k, v in comparison.items()
                                              if k != "greedy_differences"}))
    print(f"written to {out}")
    if failed:
        raise SystemExit("; ".join(failed))


if __name__ == "__main__":
    main()
