"""Honest statistics for evaluation: bootstrap intervals, paired comparisons, McNemar, spread.

Everything is seeded (``seed`` is an argument, default 0) and uses numpy only. Resampling draws
one index matrix ``[n_resamples, n]`` (in chunks of at most ``MAX_INDEX_CELLS`` cells so memory
stays bounded), so the same seed and ``n`` give the same resamples whether the metric is a mean
of per-example scores or a corpus statistic over indices; a paired comparison resamples the
*same* examples for both systems.

Two ways to describe a metric, used throughout:

- **per-example scores** (``Sequence[float]``): the metric is their mean (accuracy from 0/1
  correctness, mean sentence chrF, mean token F1, ...); resampled means are vectorised.
- **a statistic over indices** (``Callable[[np.ndarray], float]``): ``statistic(indices)``
  recomputes a corpus-level metric (BLEU, macro-F1, micro entity F1) on the examples at
  ``indices`` (with repeats); it is called once per resample, and on ``np.arange(n)`` for the
  point value. ``ratio_statistic`` builds the common "sum over sum" kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

MAX_INDEX_CELLS = 1 << 22  # ~32 MB of int64 indices per resampling chunk
SIGNIFICANCE_LEVEL = 0.05
MCNEMAR_EXACT_MAX = 1000  # exact binomial up to this many discordant pairs, chi-square above

Statistic = Callable[[np.ndarray], float]
# one system's metric on one training seed: per-example scores or a statistic over indices
Measure = Sequence[float] | Statistic


def bootstrap_ci(
    per_example: Sequence[float] | None = None,
    *,
    statistic: Statistic | None = None,
    n: int | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a metric over examples.

    Pass either ``per_example`` scores (interval of their mean) or ``statistic`` with ``n``, the
    number of examples (interval of ``statistic(indices)`` over resampled index vectors).
    """
    samples = _resampled(_as_metric(per_example, statistic, n), n_resamples, seed)
    return _percentile_interval(samples, confidence)


def metric_with_ci(
    per_example: Sequence[float] | None = None,
    *,
    statistic: Statistic | None = None,
    n: int | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """The metric's value with its bootstrap interval, ready for a JSON report.

    Returns {"value", "ci": [lo, hi], "n", "confidence", "n_resamples", "seed"}. With no
    examples (``n`` is 0) value and interval are None rather than an invented number.
    """
    record = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    if (per_example is not None and len(per_example) == 0) or (statistic is not None and n == 0):
        return {"value": None, "ci": [None, None], "n": 0, **record}
    metric = _as_metric(per_example, statistic, n)
    low, high = _percentile_interval(_resampled(metric, n_resamples, seed), confidence)
    return {"value": _point_value(metric), "ci": [low, high], "n": metric[2], **record}


def paired_bootstrap(
    base: Measure,
    tuned: Measure,
    *,
    n: int | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of tuned − base on the same examples: ``paired_comparison`` of one
    training seed each (see there for the fields)."""
    return paired_comparison([base], [tuned], n=n, n_resamples=n_resamples,
                             confidence=confidence, seed=seed)


def paired_comparison(
    base: Sequence[Measure],
    tuned: Sequence[Measure],
    *,
    n: int | None = None,
    exact_test: bool = False,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """tuned − base on the same test examples, each system given as one measure per training
    seed (a single-element list for a single run): the one "A against B with an interval" of
    the project (evaluation, multitask, sweeps and assessments all call it).

    Each measure is per-example scores or a statistic over indices (then pass ``n``). The
    interval is a hierarchical bootstrap: each resample draws the test examples (the same rows
    for both systems) and, for a system with several seeds, that many seeds with replacement;
    its metric is the mean over the drawn seeds. With one seed each this is the ordinary
    paired bootstrap. ``p_value`` is two-sided (twice the share of resampled deltas on the
    other side of 0, ties against, +1 corrected), so it cannot go below ``p_floor`` =
    2 / (n_resamples + 1): ``p_text`` says "< floor" there. With ``exact_test`` (a right/wrong
    primary metric, as the task says) and one seed each, McNemar's exact test gives the
    p-value instead and ``test`` says so.
    """
    if not base or not tuned:
        raise ValueError("each system needs at least one measure (one per training seed)")
    base_metrics = [_measure(m, n) for m in base]
    tuned_metrics = [_measure(m, n) for m in tuned]
    size = base_metrics[0][2]
    if any(metric[2] != size for metric in base_metrics + tuned_metrics):
        raise ValueError("paired measures differ in their number of examples; they must be "
                         "the same examples")
    base_value = float(np.mean([_point_value(m) for m in base_metrics]))
    tuned_value = float(np.mean([_point_value(m) for m in tuned_metrics]))
    rows = _row_matrix(size, n_resamples, seed)
    draws = np.random.default_rng([seed, 1])
    deltas = (_seed_resampled(tuned_metrics, rows, draws)
              - _seed_resampled(base_metrics, rows, draws))
    delta = tuned_value - base_value
    low, high = _percentile_interval(deltas, confidence)
    if delta > 0:
        other_side = int(np.count_nonzero(deltas <= 0))
    elif delta < 0:
        other_side = int(np.count_nonzero(deltas >= 0))
    else:
        other_side = n_resamples
    p_value = min(1.0, 2 * (other_side + 1) / (n_resamples + 1))
    p_floor = min(1.0, 2 / (n_resamples + 1))
    result = {
        "delta": delta, "ci": [low, high], "p_value": p_value, "p_floor": p_floor,
        "significant": bool(low > 0 or high < 0), "test": "paired bootstrap", "n": size,
        "base": base_value, "tuned": tuned_value,
        "seeds": {"base": len(base), "tuned": len(tuned)},
        "confidence": confidence, "n_resamples": n_resamples, "seed": seed,
    }
    if len(base) > 1 or len(tuned) > 1:
        result["test"] = "hierarchical bootstrap (test examples and training seeds)"
    elif exact_test and base_metrics[0][0] is not None and tuned_metrics[0][0] is not None:
        exact = mcnemar(base_metrics[0][0] > 0.5, tuned_metrics[0][0] > 0.5)
        result.update(p_value=exact["p_value"], p_floor=0.0, test="mcnemar",
                      significant=exact["significant"], discordant=[exact["b"], exact["c"]])
    result["p_text"] = p_text(result["p_value"], result["p_floor"])
    return result


def p_text(p_value: float, p_floor: float = 0.0) -> str:
    """"p = 0.03", or "p < 0.002" at a resampling test's floor (it cannot go lower)."""
    if p_floor and p_value <= p_floor * (1 + 1e-9):
        return f"p < {p_floor:.2g}"
    return f"p = {p_value:.2g}"


def resampled_curve(fractions: Sequence[Sequence[Measure]], *, n: int | None = None,
                    n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """``[n_resamples, len(fractions)]``: the metric of each fraction (one measure per training
    seed) on each hierarchical bootstrap resample, the test rows shared across fractions and
    seeds, the seeds drawn with replacement within each fraction; the same rows as
    ``paired_comparison`` with this seed."""
    metrics = [[_measure(m, n) for m in seeds] for seeds in fractions]
    size = metrics[0][0][2]
    if any(metric[2] != size for seeds in metrics for metric in seeds):
        raise ValueError("every fraction and seed must be scored on the same test examples")
    rows = _row_matrix(size, n_resamples, seed)
    draws = np.random.default_rng([seed, 1])
    return np.stack([_seed_resampled(seeds, rows, draws) for seeds in metrics], axis=1)


def _measure(measure: Measure, n: int | None) -> tuple[np.ndarray | None, Statistic | None, int]:
    return _as_metric(None, measure, n) if callable(measure) else _as_metric(measure, None, n)


def _row_matrix(n: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.concatenate(list(_index_chunks(n, n_resamples, seed)))


def _seed_resampled(metrics: list, rows: np.ndarray, draws: np.random.Generator) -> np.ndarray:
    """The mean over drawn seeds (with replacement; all of them when there is one) of each
    seed's metric on each row of ``rows``."""
    per_seed = np.stack([_on_rows(metric, rows) for metric in metrics])  # [seeds, resamples]
    if len(metrics) == 1:
        return per_seed[0]
    chosen = draws.integers(0, len(metrics), size=(rows.shape[0], len(metrics)))
    return per_seed[chosen, np.arange(rows.shape[0])[:, None]].mean(axis=1)


def _on_rows(metric: tuple[np.ndarray | None, Statistic | None, int],
             rows: np.ndarray) -> np.ndarray:
    values, statistic, _ = metric
    if values is not None:
        return values[rows].mean(axis=1)
    return np.array([statistic(row) for row in rows], dtype=float)


def mcnemar(base_correct: Sequence[bool], tuned_correct: Sequence[bool]) -> dict:
    """McNemar's test on paired right/wrong outcomes of two systems on the same examples.

    ``b`` counts examples only base got right, ``c`` those only tuned got right. The two-sided
    p-value is exact (binomial, p=1/2, on the b + c discordant pairs) up to
    ``MCNEMAR_EXACT_MAX`` discordant pairs and the continuity-corrected chi-square above.
    """
    if len(base_correct) != len(tuned_correct):
        raise ValueError(f"paired outcomes differ in length: base has {len(base_correct)}, "
                         f"tuned has {len(tuned_correct)}; they must be the same examples")
    base_array = np.asarray(base_correct, dtype=bool)
    tuned_array = np.asarray(tuned_correct, dtype=bool)
    b = int(np.count_nonzero(base_array & ~tuned_array))
    c = int(np.count_nonzero(~base_array & tuned_array))
    discordant = b + c
    if discordant <= MCNEMAR_EXACT_MAX:
        method = "exact binomial"
        # Exact integer sum, one division: no float underflow for large b + c.
        tail = sum(math.comb(discordant, k) for k in range(min(b, c) + 1))
        p_value = min(1.0, 2 * tail / 2**discordant)
    else:
        method = "chi-square with continuity correction"
        chi_square = max(0, abs(b - c) - 1) ** 2 / discordant
        p_value = math.erfc(math.sqrt(chi_square / 2))  # survival function of chi-square, 1 df
    return {"b": b, "c": c, "p_value": p_value, "significant": p_value < SIGNIFICANCE_LEVEL,
            "test": "mcnemar", "method": method, "n": len(base_array)}


def spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation, min and max of a metric across prompt variants."""
    array = _finite_array(values)
    if len(array) == 0:
        raise ValueError("spread needs at least one value")
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "min": float(array.min()),
            "max": float(array.max()), "n_variants": len(array)}


def ratio_statistic(numerators: Sequence[float], denominators: Sequence[float]) -> Statistic:
    """A statistic ``sum(numerators[i]) / sum(denominators[i])`` over resampled indices.

    Micro F1 is ``ratio_statistic(2 * tp, n_predicted + n_gold)``; a span-level rate is
    ``ratio_statistic(n_bad, n_spans)``. A zero denominator gives 0.0.
    """
    top, bottom = _finite_array(numerators), _finite_array(denominators)
    if len(top) != len(bottom):
        raise ValueError(f"{len(top)} numerators but {len(bottom)} denominators")

    def statistic(indices: np.ndarray) -> float:
        total = bottom[indices].sum()
        return float(top[indices].sum() / total) if total else 0.0

    return statistic


def _as_metric(per_example: Sequence[float] | None, statistic: Statistic | None,
               n: int | None) -> tuple[np.ndarray | None, Statistic | None, int]:
    """Validate the two ways of giving a metric; returns (values, statistic, n)."""
    if (per_example is None) == (statistic is None):
        raise TypeError("pass exactly one of per_example scores or statistic=")
    if statistic is not None:
        if n is None or n < 1:
            raise ValueError(f"a statistic needs n, the number of examples (>= 1); got n={n}")
        return None, statistic, int(n)
    values = _finite_array(per_example)
    if len(values) == 0:
        raise ValueError("no per-example scores to bootstrap")
    if n is not None and n != len(values):
        raise ValueError(f"n={n} but {len(values)} per-example scores were given")
    return values, None, len(values)


def _point_value(metric: tuple[np.ndarray | None, Statistic | None, int]) -> float:
    values, statistic, n = metric
    return float(values.mean()) if values is not None else float(statistic(np.arange(n)))


def _resampled(metric: tuple[np.ndarray | None, Statistic | None, int], n_resamples: int,
               seed: int) -> np.ndarray:
    """The metric on each of ``n_resamples`` bootstrap resamples of the examples."""
    values, statistic, n = metric
    if values is not None:
        return np.concatenate([values[chunk].mean(axis=1)
                               for chunk in _index_chunks(n, n_resamples, seed)])
    return np.array([statistic(row) for row in _all_rows(n, n_resamples, seed)], dtype=float)


def _index_chunks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Resampled index rows ``[rows, n]``, drawn in bounded chunks from one seeded stream."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, MAX_INDEX_CELLS // n)
    for start in range(0, n_resamples, rows_per_chunk):
        yield rng.integers(0, n, size=(min(rows_per_chunk, n_resamples - start), n))


def _all_rows(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    for chunk in _index_chunks(n, n_resamples, seed):
        yield from chunk


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(low), float(high)


def _finite_array(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError("scores contain NaN or infinity; fix the metric before bootstrapping")
    return array
