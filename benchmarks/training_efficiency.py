"""The planner's CPU training efficiency, fitted on recorded example runs.

``tunelab plan`` predicts training time as FLOPs / (matmul FLOP/s × efficiency) + non-matmul
costs (``planner/speed.py``). This script takes the example runs committed under
``examples/*/results/manifest.json`` that ran under the allocator the CLI gives by default
(jemalloc), re-plans each one's config on this machine, and solves for the efficiency its
measured training time implies:

    efficiency = run FLOPs / (matmul FLOP/s × (measured train_s − non-matmul s))

    python benchmarks/training_efficiency.py      # writes results/training-efficiency-cpu.json
    python benchmarks/training_efficiency.py --smoke   # one run, result in a temporary folder

``TRAINING_EFFICIENCY["cpu"]`` is the median. The plan check (``train_throughput.py
--plan-check``) then tests the constant on other configurations and models.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import smoke
from provenance import provenance

from tunelab.planner.predict import plan
from tunelab.planner.speed import TRAINING_EFFICIENCY

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: the first recorded run only, the "
                             "result in a temporary folder")
    parser.add_argument("--out", type=Path,
                        help="result file (default results/training-efficiency-cpu.json)")
    args = parser.parse_args(argv)
    from tunelab.config import load_config

    origin, rows = provenance(), []
    for manifest_path in recorded_runs(limit=1 if args.smoke else None):
        manifest = json.loads(manifest_path.read_text())
        config_path = manifest_path.parent.parent / "config.yaml"
        time = plan(load_config(config_path)).time
        flops, overhead = time["run_flops"], time["non_matmul_s"]
        matmul, measured_s = time["device_matmul_flops_per_s"], manifest["train_s"]
        row = {"config": str(config_path.relative_to(REPO)), "run_flops": flops,
               "matmul_flops_per_s": matmul, "non_matmul_s": overhead,
               "measured_train_s": measured_s,
               "measured_tokens_per_second": manifest["tokens_per_second"],
               "predicted_tokens_per_second": time["predicted_tokens_per_second"],
               "implied_efficiency": flops / (matmul * (measured_s - overhead))}
        rows.append(row)
        print(f"{row['config']:45s} matmul {matmul / 1e9:6.1f} GFLOP/s  measured "
              f"{measured_s:6.1f} s  predicted {row['predicted_tokens_per_second']:6.1f} tok/s "
              f"(measured {row['measured_tokens_per_second']:6.1f})  implied efficiency "
              f"{row['implied_efficiency']:.2f}", flush=True)
    median = statistics.median(row["implied_efficiency"] for row in rows)
    print(f"median implied efficiency {median:.2f} (TRAINING_EFFICIENCY['cpu'] is "
          f"{TRAINING_EFFICIENCY['cpu']})")
    name = "training-efficiency-cpu.json"
    out = smoke.result_path(args.out, name) if args.smoke else args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "training_efficiency", **origin,
                               "median_implied_efficiency": median,
                               "constant": TRAINING_EFFICIENCY["cpu"], "runs": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


def recorded_runs(limit: int | None = None) -> list[Path]:
    """The committed example runs' manifests that ran under jemalloc (runs from before it had a
    different, slower training loop), the first ``limit`` of them."""
    found = [path for path in sorted(REPO.glob("examples/**/results/manifest.json"))
             if (json.loads(path.read_text()).get("allocator") or {}).get("name") == "jemalloc"]
    return found[:limit]


if __name__ == "__main__":
    main()
