#!/usr/bin/env bash
# Re-measure every published benchmark and example, in order, on a fixed commit:
#   bash benchmarks/run_all.sh
# then `python scripts/published.py --write` re-renders the README tables from the new results.
# On a shared machine, give this session priority over the other jobs (the load is recorded in
# every result file either way):
#   setsid bash benchmarks/run_all.sh & echo -15 > /proc/$!/autogroup
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/train_throughput.py
python benchmarks/train_throughput.py --levers
python benchmarks/padded_growth.py
python benchmarks/training_efficiency.py
python benchmarks/train_throughput.py --plan-check
python benchmarks/generation.py
python benchmarks/llama_cpp_check.py   # builds llama.cpp once into ~/.cache/tunelab (~15 min)
python scripts/run_example.py examples/sentiment
