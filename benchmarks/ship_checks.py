"""The README's "done when" for shipping, run end to end on the example runs.

Exports the sentiment run to a merged Hugging Face folder and to GGUF (F16 and Q8_0) with every
check ``tunelab export`` makes (logits reloaded by plain transformers, GGUFReader metadata), and
its adapter with vLLM's rules; then starts ``tunelab serve SENTIMENT [OTHERS]`` on 127.0.0.1 and
asks it through the official ``openai`` client (a completion per run, a streamed chat on the
base).
The checks' numbers and the answers go to a result file with provenance. Nothing here is timed.

    python benchmarks/ship_checks.py runs/sentiment-lora runs/ner-lora
    python benchmarks/ship_checks.py --smoke   # seconds: a tiny run trained here

``--smoke`` takes the whole path in seconds, for the test suite: it trains a run of the
sentiment example on the test suite's tiny model (``benchmarks/smoke.py``, in this process),
exports and serves it (the server is the one subprocess), and writes the result to a temporary
folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import smoke  # benchmarks/smoke.py, beside this script
from provenance import provenance  # benchmarks/provenance.py, beside this script
from serve_load import split_file

from tunelab.ship.export import export_run

RESULTS = Path(__file__).parent / "results"
EXPORTS = (("merged", "f16"), ("gguf", "f16"), ("gguf", "q8_0"), ("adapter", "f16"))


def exports(run: Path, folder: Path) -> list[dict]:
    """Each export of ``run`` into ``folder`` with its checks (files are deleted afterwards)."""
    done = []
    for kind, quant in EXPORTS:
        name = f"{kind}-{quant}" if kind == "gguf" else kind
        result = export_run(run, kind, out=folder / name, quant=quant)
        done.append({"export": name, **result.to_json()})
        shutil.rmtree(folder / name)
    return done


def served_answers(runs: list[Path], test_rows: dict[str, dict]) -> dict:
    """Start ``tunelab serve`` on the runs and ask each run and the base through openai."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", *map(str, runs),
                               "--port", str(port), "--api-key", "sk-local"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-local",
                           max_retries=0, timeout=600)
    try:
        models = None
        deadline = time.monotonic() + 900
        while models is None and server.poll() is None and time.monotonic() < deadline:
            try:
                models = [m.id for m in client.models.list()]
            except openai.APIConnectionError:
                time.sleep(1)
        if models is None:
            raise SystemExit(f"the server did not answer: {server.communicate(timeout=5)[0]}")
        answers = {"models": models, "completions": []}
        for name, row in test_rows.items():
            response = client.completions.create(model=name, prompt=row["prompt"], temperature=0,
                                                 max_tokens=row["max_tokens"], stop=["\n\n"])
            answers["completions"].append({"model": name, "prompt": row["prompt"],
                                           "expected": row["expected"],
                                           "answer": response.choices[0].text,
                                           "finish_reason": response.choices[0].finish_reason})
        chunks = client.chat.completions.create(
            model=models[0], messages=[{"role": "user", "content": "Name a famous film."}],
            max_tokens=24, temperature=0, stream=True)
        answers["streamed_chat_on_base"] = "".join(c.choices[0].delta.content or ""
                                                   for c in chunks if c.choices)
        return answers
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(120)


def first_test_row(run: Path, max_tokens: int) -> dict:
    import yaml

    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    row = json.loads(Path(split_file(data)).read_text().splitlines()[0])
    return {"prompt": data["prompt"].format(**row),
            "expected": data["completion"].format(**row), "max_tokens": max_tokens}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentiment", type=Path, nargs="?",
                        help="the run to export and serve (none with --smoke)")
    parser.add_argument("others", type=Path, nargs="*", help="more runs to serve beside it")
    parser.add_argument("--out", type=Path,
                        help="result file (default results/serve-ship-checks.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: a tiny run trained here, the result "
                             "in a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke == (args.sentiment is not None):
        parser.error("give the sentiment run, or --smoke (which trains its own)")
    if not args.smoke:
        return check(args.sentiment, args.others, args.out or RESULTS / "serve-ship-checks.json")
    with tempfile.TemporaryDirectory(prefix="tunelab-ship-smoke-") as scratch:
        model = smoke.tiny_model(Path(scratch) / "tiny-model")
        run = smoke.tiny_run(Path(scratch) / "runs", "smoke-sentiment", model)
        check(run, [], smoke.result_path(args.out, "serve-ship-checks.json"))


def check(sentiment: Path, others: list[Path], out: Path) -> None:
    """Export ``sentiment`` every way, serve it beside ``others``; checks and answers to
    ``out``, exiting non-zero when a check with a bound failed."""
    origin = provenance()
    with tempfile.TemporaryDirectory(dir=sentiment) as folder:
        exported = exports(sentiment, Path(folder))
    served = [sentiment, *others]
    rows = {json.loads((run / "manifest.json").read_text())["name"]:
            first_test_row(run, 2 if run == sentiment else 48) for run in served}
    answers = served_answers(served, rows)
    origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {**origin, "run": str(sentiment), "exports": exported, "serve": answers}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    failed = [c["name"] for e in exported for c in e["checks"]
              if not c["passed"] and c["tolerance"] is not None]
    print(json.dumps({e["export"]: [(c["name"], c["value"], c["passed"]) for c in e["checks"]]
                      for e in exported}, indent=1))
    print(json.dumps(answers, indent=1))
    print(f"written to {out}")
    if failed:
        raise SystemExit(f"checks failed: {failed}")


if __name__ == "__main__":
    main()
