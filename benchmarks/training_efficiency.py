"""The planner's CPU training efficiency, fitted on recorded example runs.

``tunelab plan`` predicts training time as FLOPs / (matmul FLOP/s × efficiency) + non-matmul
costs (``model/plan.py``). This script takes the example runs committed under
``examples/*/results/manifest.json`` that ran under the allocator the CLI gives by default
(jemalloc), re-plans each one's config on this machine, and solves for the efficiency its
measured training time implies:

    efficiency = run FLOPs / (matmul FLOP/s × (measured train_s − non-matmul s))

    python benchmarks/training_efficiency.py      # writes results/training-efficiency-cpu.json

``TRAINING_EFFICIENCY["cpu"]`` is the median. The plan check (``train_throughput.py
--plan-check``) then tests the constant on other configurations and models.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from provenance import provenance

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    from tunelab.config import load_config
    from tunelab.model.plan import TRAINING_EFFICIENCY, plan

    origin, rows = provenance(), []
    for manifest_path in sorted(REPO.glob("examples/**/results/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        if (manifest.get("allocator") or {}).get("name") != "jemalloc":
            continue  # runs from before jemalloc: a different (slower) training loop
        config_path = manifest_path.parent.parent / "config.yaml"
        time = plan(load_config(config_path))["time"]
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
    out = RESULTS / "training-efficiency-cpu.json"
    out.write_text(json.dumps({"benchmark": "training_efficiency", **origin,
                               "median_implied_efficiency": median,
                               "constant": TRAINING_EFFICIENCY["cpu"], "runs": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
