"""Run ``tunelab assess`` on a shipped example as its README says, and keep what it measured.

    python scripts/run_assess.py examples/sentiment

runs ``tunelab assess CONFIG`` (the default assessment: shots, fractions and seeds as the
command chooses them) from the working tree in a work folder that survives the call, and writes
``EXAMPLE/results/assess/``: ``assess.json``, ``curve-scores.json``, ``report.html``,
``learning-curve.svg`` and ``result.json`` (command, git commit, machine, load average at start
and end, the command's wall time). ``--alone`` says nothing else ran on the machine (the wall
time is then published as the assessment's cost).

    python scripts/run_assess.py examples/sentiment --serve embedded:gemma3-270m \\
        --name assess-endpoint -- --shots 0

starts ``tunelab serve --base MODEL`` on a free local port, adds it to the assessment as
``--baseline NAME=URL`` (NAME from ``--serve-name``), and stops it afterwards; arguments after
``--`` go to ``tunelab assess``. In the same ``--workdir`` as an earlier call, the finished runs
and evaluations are reused, so only the new arm is measured.

``--smoke`` runs the same path in seconds for the test suite (``benchmarks/smoke.py``: the tiny
model, the first lines of each data file), in this process, results to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import smoke  # noqa: E402
from provenance import provenance  # noqa: E402

KEPT = ("assess.json", "curve-scores.json", "report.html", "learning-curve.svg")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", type=Path, help="an example folder with a config.yaml")
    parser.add_argument("--name", default="assess", help="results/<name>/ (default assess)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir())
                        / "tunelab-assess", help="where the runs live between calls")
    parser.add_argument("--serve", help="a base model to serve as an endpoint arm")
    parser.add_argument("--serve-name", default="served", help="the endpoint arm's name")
    parser.add_argument("--alone", action="store_true", help="nothing else ran meanwhile")
    parser.add_argument("--smoke", action="store_true", help="seconds, for the test suite")
    parser.add_argument("--out", type=Path, help="with --smoke: the folder for the results")
    args = parser.parse_args(argv)
    example = args.example.resolve()
    origin = provenance()
    scratch = Path(tempfile.mkdtemp(prefix="tunelab-assess-smoke-")) if args.smoke else None
    config = example / "config.yaml"
    workdir = args.workdir.resolve() / example.name
    if args.smoke:
        model = smoke.tiny_model(scratch / "tiny-model")
        config = smoke.smoke_config(config, scratch / "config", model)
        workdir = scratch / "runs"
        extra = ["--shots", "0", "--fractions", "1/2,1", "--seeds", "2,1", *extra]
    command = ["tunelab", "assess", str(config), "--set", f"output_dir={workdir}", *extra]
    server = None
    try:
        if args.serve:
            server, url = start_server(str(model) if args.smoke else args.serve)
            command += ["--baseline", f"{args.serve_name}={url}"]
        started = time.perf_counter()
        log = (scratch or workdir) / f"{args.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if args.smoke:
            code = smoke.tunelab(command[1:], log)
        else:
            with open(log, "w") as handle:
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env={**os.environ, "COLUMNS": "120"}).returncode
        wall_s = time.perf_counter() - started
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    if code != 0:
        sys.exit(f"{log.read_text(errors='replace')[-3000:]}\n{' '.join(command)} failed "
                 f"(exit {code})")
    folder = workdir / f"{_config_name(config)}-assess"
    results = (smoke.result_path(args.out, args.name) if args.smoke
               else example / "results" / args.name)
    results.mkdir(parents=True, exist_ok=True)
    for kept in KEPT:
        shutil.copy(folder / kept, results / kept)
    origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    relative = (lambda p: str(p.relative_to(ROOT))) if not args.smoke else str  # noqa: E731
    result = {**origin, "what": f"tunelab assess on {example.name}"
              + (f" with {args.serve} served by tunelab serve as the endpoint arm "
                 f"{args.serve_name!r}" if args.serve else ""),
              "assess_command": " ".join(command[:2] + [relative(Path(command[2]))]
                                         + command[3:]),
              "measured_alone": bool(args.alone), "wall_s": round(wall_s, 1),
              "assess": relative(results / "assess.json"),
              "curve_scores": relative(results / "curve-scores.json"),
              "curve": relative(results / "learning-curve.svg"),
              "report": relative(results / "report.html")}
    (results / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {results} ({wall_s / 60:.1f} min)")


def _config_name(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["name"]


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    """``tunelab serve --base MODEL`` on a free port, once it answers; (process, base URL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", "--base", model,
                                "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"tunelab serve --base {model} exited {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(1)
    process.terminate()
    sys.exit(f"tunelab serve --base {model} did not answer in 600 s")


if __name__ == "__main__":
    main()
