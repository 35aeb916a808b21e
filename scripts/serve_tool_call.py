"""Serve a tool-calling run with `tunelab serve`; ask it held-out requests through openai.

    tunelab train examples/tools/config.yaml
    python scripts/serve_tool_call.py runs/tools-lora

starts ``tunelab serve RUN`` (the real command, on a free port), sends each held-out record of
``examples/tools/test.jsonl`` (its conversation before the last assistant turn, with its
``tools``) to the tuned run and to the base model the same server serves, once non-streamed and
once streamed (the openai client's ``chat.completions.stream``, which accumulates the
``tool_calls`` deltas), greedy, and counts the answers that make the reference call: the same
function with JSON-equal arguments (``eval.metrics.tool_calls_match``, what ``tunelab eval``'s
tool_call task scores). Writes ``examples/tools/results/serve.json``: the shares with 95%
bootstrap intervals, finish reasons, latency, the streamed answers' agreement with the
non-streamed ones, one exchange in full, and the provenance (command, commit, machine, load).

    python scripts/serve_tool_call.py --smoke

does the same in seconds for the test suite: a two-step run of the example's config on the
test suite's tiny model, three requests (each offering only the function it calls), the
result in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import provenance  # noqa: E402

EXAMPLE = ROOT / "examples" / "tools"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, port: int, log: Path) -> subprocess.Popen:
    """``tunelab serve RUN`` in its own process, once it answers /health."""
    handle = open(log, "w")  # noqa: SIM115 - the server writes to it until it is stopped
    server = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(run), "--port",
                               str(port)], stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "COLUMNS": "120"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"{log.read_text()[-3000:]}\ntunelab serve exited ({server.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit("tunelab serve did not answer /health within 600 s")


def reference_calls(record: dict) -> list[dict]:
    """The record's last assistant turn's calls as ``{"name", "arguments"}``."""
    calls = record["messages"][-1]["tool_calls"]
    return [{"name": call["function"]["name"],
             "arguments": json.loads(call["function"]["arguments"])} for call in calls]


def answered_calls(message) -> list[dict]:
    return [{"name": call.function.name, "arguments": json.loads(call.function.arguments)}
            for call in message.tool_calls or []]


def ask(client, model: str, record: dict, stream: bool, max_tokens: int):
    """One request: the answer's message, its finish reason and the wall time in seconds."""
    options = {"model": model, "messages": record["messages"][:-1], "tools": record["tools"],
               "temperature": 0, "max_tokens": max_tokens}
    started = time.perf_counter()
    if stream:
        import openai

        with client.chat.completions.stream(**options) as events:
            try:
                choice = events.get_final_completion().choices[0]
            except openai.LengthFinishReasonError as cut:  # the helper refuses a cut answer
                choice = cut.completion.choices[0]
    else:
        choice = client.chat.completions.create(**options).choices[0]
    return choice.message, choice.finish_reason, time.perf_counter() - started


def measure(client, model: str, records: list[dict], max_tokens: int) -> dict:
    """Both ways of asking, scored against the references."""
    from tunelab.eval.metrics import tool_calls_match
    from tunelab.eval.stats import bootstrap_ci

    outcome: dict = {}
    answers: dict[bool, list] = {}
    for stream in (False, True):
        right, names, reasons, seconds, shown = [], [], {}, [], []
        for record in records:
            message, reason, elapsed = ask(client, model, record, stream, max_tokens)
            gold, called = reference_calls(record), answered_calls(message)
            right.append(float(tool_calls_match(gold, called)))
            names.append(float(tool_calls_match(gold, called, names_only=True)))
            reasons[reason] = reasons.get(reason, 0) + 1
            seconds.append(elapsed)
            shown.append((message.content or None, called))  # the stream's is "", not None
        answers[stream] = shown
        outcome["streamed" if stream else "non_streamed"] = {
            "right_call": round(sum(right) / len(right), 4),
            "right_call_ci": [round(x, 4) for x in bootstrap_ci(right, n_resamples=2000)],
            "right_function": round(sum(names) / len(names), 4),
            "right_calls": int(sum(right)), "n": len(right), "finish_reasons": reasons,
            "median_latency_s": round(sorted(seconds)[len(seconds) // 2], 3)}
    outcome["streamed_equals_non_streamed"] = round(
        sum(a == b for a, b in zip(answers[False], answers[True], strict=True)) / len(records), 4)
    return outcome


def smoke_run(folder: Path) -> Path:
    """A two-step run of the example's config on the test suite's tiny model."""
    import smoke

    model = smoke.tiny_model(folder / "tiny-model")
    return smoke.tiny_run(folder, "tools-smoke", model, EXAMPLE / "config.yaml")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", help="the trained run directory")
    parser.add_argument("--data", type=Path, default=EXAMPLE / "test.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="the first N records only")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="where to write the result")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite (a tiny run, three requests)")
    args = parser.parse_args(argv)
    if args.run is None and not args.smoke:
        parser.error("name the run directory (tunelab train examples/tools/config.yaml)")
    origin = provenance()
    records = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    records = records[:3 if args.smoke else args.limit]
    if args.smoke:  # the tiny model's 512 positions hold one request and function, not three
        records = [{"messages": record["messages"][-2:], "tools": [
            tool for tool in record["tools"]
            if tool["function"]["name"] in {call["name"] for call in reference_calls(record)}]}
            for record in records]
        args.max_tokens = 8
    with tempfile.TemporaryDirectory(prefix="tunelab-serve-tools-") as scratch:
        run = smoke_run(Path(scratch)) if args.smoke else args.run.resolve()
        out = args.out or (Path(scratch).parent / "tunelab-serve-tools-smoke.json" if args.smoke
                           else EXAMPLE / "results" / "serve.json")
        port = free_port()
        log = Path(scratch) / "serve.log"
        server = start_server(run, port, log)
        try:
            import openai

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                   max_retries=0, timeout=600)
            base, tuned = [model.id for model in client.models.list()]
            measured = {name: measure(client, model, records, args.max_tokens)
                        for name, model in (("tuned", tuned), ("base", base))}
            example = ask(client, tuned, records[0], False, args.max_tokens)[0]
        finally:
            server.terminate()
            server.wait(60)
    manifest = json.loads((run / "manifest.json").read_text()) if not args.smoke else {}
    origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {**origin, "run": str(run) if args.smoke else run.name,
              "training": {key: manifest.get(key) for key in (
                  "name", "seed", "device", "steps", "val_loss_before", "val_loss_after",
                  "tokens_per_second", "train_s", "wall_s")},
              "data": str(args.data.resolve().relative_to(ROOT)), "n_requests": len(records),
              "models": {"tuned": tuned, "base": base}, "greedy": True,
              "max_tokens": args.max_tokens, **measured,
              "example": {"request": records[0]["messages"][-2]["content"],
                          "reference": reference_calls(records[0]),
                          "answer": {"content": example.content,
                                     "tool_calls": answered_calls(example)}}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    tuned_share, base_share = (measured[name]["non_streamed"]["right_call"]
                               for name in ("tuned", "base"))
    print(f"wrote {out}: right call {tuned_share:.0%} tuned, {base_share:.0%} base "
          f"({len(records)} requests)")


if __name__ == "__main__":
    main()
