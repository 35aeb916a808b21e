"""The assessment's decision rules: which prompting arm to compare with, which tuned runs can be
trusted, and the verdict. Pure functions of measured numbers, so each rule is tested alone.

- ``choose_arm``: among prompting choices measured on validation, the best one unless a cheaper
  one is not separated from it (their paired interval holds 0): then the cheapest of those.
  Validation noise must not buy a costlier baseline.
- ``degenerate_reasons``: a tuned run that answers every test example alike, was trained for a
  handful of steps, or whose training loss never fell, says nothing about the task.
- ``verdict``: tuned (all data) against the validation-chosen arm *and* against the strongest
  arm on test; a verdict for fine-tuning must hold against both, and a run that cannot be
  trusted makes it "undecided" with the reason and the fix.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

# Verdict thresholds, in units of a 0..1 metric (times the metric's scale for 0..100 metrics):
# a gain over prompting below MIN_EFFECT is not worth a fine-tuning run; a curve whose gain per
# doubling of data stays below MIN_GAIN_PER_DOUBLING is flat.
MIN_EFFECT = 0.02
MIN_GAIN_PER_DOUBLING = 0.01
VERDICTS = ("fine-tune and collect more data", "fine-tune", "undecided", "not worth it yet",
            "prompting is enough")
GOES = VERDICTS[:2]
# A run whose most common answer covers this share of the test examples, where the references'
# most common covers less, has collapsed to a constant predictor.
COLLAPSED_SHARE = 0.95
# Fewer optimizer steps than this, and the run measures its schedule more than its data.
MIN_STEPS = 3
# The training loss of a run that learned falls below this share of its first step's loss.
LEARNED_LOSS_SHARE = 0.9


# --- which prompting arm ---------------------------------------------------------------------


def choose_arm(candidates: Sequence[dict], separated: Callable[[dict, dict], bool]) -> dict:
    """The arm to compare with: the best on validation (``candidate["validation"]``), or the
    cheapest (``candidate["cost"]``, a sortable key: shots, then prompt tokens) among those that
    ``separated(best, candidate)`` says validation cannot tell from the best.

    Returns the chosen candidate with ``selection`` (why) and ``tied_with`` (the names of the
    candidates that validation could not separate from the best).
    """
    if not candidates:
        raise ValueError("no prompting arm to choose from")
    best = max(candidates, key=lambda c: (c["validation"], [-x for x in _key(c["cost"])]))
    tied = [c for c in candidates if c is best or not separated(best, c)]
    cheapest = min(tied, key=lambda c: _key(c["cost"]))
    if cheapest is best:
        why = "best on validation" + (
            f"; {len(tied) - 1} other choice(s) within noise of it cost more" if len(tied) > 1
            else "")
    else:
        why = (f"the cheapest of {len(tied)} choices that validation cannot separate (paired "
               f"interval holds 0); the best on validation was {best['name']} "
               f"({best['validation']:.4g} against {cheapest['validation']:.4g})")
    return {**cheapest, "selection": why, "tied_with": [c["name"] for c in tied
                                                         if c is not cheapest]}


def _key(cost: Any) -> tuple:
    return tuple(cost) if isinstance(cost, (list, tuple)) else (cost,)


# --- which tuned runs can be trusted ---------------------------------------------------------


def degenerate_reasons(predictions: Sequence[str], golds: Sequence[str], *, steps: int | None,
                       losses: Sequence[float]) -> list[dict]:
    """Why a tuned run says nothing about its task (empty: it can be trusted): each reason is
    {"kind", "text", "fix"}.

    ``predictions`` and ``golds`` are its test answers and references as shown; ``losses`` its
    training loss per step.
    """
    reasons = []
    if len(predictions) >= 10:
        answer, count = Counter(predictions).most_common(1)[0]
        share = count / len(predictions)
        gold_share = Counter(golds).most_common(1)[0][1] / len(golds) if golds else 1.0
        if share >= COLLAPSED_SHARE and gold_share < COLLAPSED_SHARE:
            reasons.append({
                "kind": "collapsed",
                "text": f"{share:.0%} of its test answers are {_short(answer)!r} (the references' "
                        f"most common answer is {gold_share:.0%} of them): a constant predictor",
                "fix": "train longer (train.epochs or train.max_steps), or with another "
                       "train.lr; check how many examples were truncated (tunelab data check)"})
    if steps is not None and steps < MIN_STEPS:
        reasons.append({
            "kind": "under-trained",
            "text": f"{steps} optimizer step(s): the run measures its learning-rate schedule "
                    "more than its data",
            "fix": f"give each fraction at least {MIN_STEPS} steps: more train.epochs, or a "
                   "smaller train.batch_tokens"})
    finite = [loss for loss in losses if math.isfinite(loss)]
    if len(finite) >= 4:
        tail = finite[-max(1, len(finite) // 4):]
        if sum(tail) / len(tail) >= LEARNED_LOSS_SHARE * finite[0]:
            reasons.append({
                "kind": "did not learn",
                "text": f"its training loss never fell: {finite[0]:.3g} at the first step, "
                        f"{sum(tail) / len(tail):.3g} over the last quarter",
                "fix": "raise train.lr, or check data.completion: is the loss on the answer?"})
    return reasons


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --- the verdict -----------------------------------------------------------------------------


def verdict(deltas: dict[str, dict], gain: dict | None, *, metric: str, n_test: int,
            min_effect: float = MIN_EFFECT, min_gain: float = MIN_GAIN_PER_DOUBLING,
            distrust: Sequence[dict] = (), predicted_4x: dict | None = None,
            prompting_value: float | None = None, target: dict | None = None) -> dict:
    """The decision from tuned (all data) − each prompting arm in ``deltas`` (name → {"value",
    "ci"}; the validation-chosen arm and the strongest on test, which may be the same) and the
    gain per doubling (``gain``).

    Against one arm, checked in this order:

    1. fine-tune and collect more data: tuned is better (delta's interval above 0) and the gain
       per doubling's interval is above ``min_gain``;
    2. fine-tune: tuned is better;
    3. undecided, evaluate on more test examples: delta's interval holds 0 but also gains of
       ``min_effect`` or more (no interval: undecided too);
    4. not worth it yet: no gain over prompting (delta's upper end below ``min_effect``) and a
       flat curve (the gain per doubling's upper end below ``min_gain``);
    5. prompting is enough: no gain over prompting.

    A verdict for fine-tuning is given only when it holds against every arm (the weaker of the
    two go-verdicts); otherwise the verdict against the arm that stops it. Reasons in
    ``distrust`` (tuned runs that cannot be trusted, see ``degenerate_reasons``) make it
    "undecided" with the reason and the fix, whatever the numbers say.
    """
    each = {name: _against(name, delta, gain, metric=metric, n_test=n_test,
                           min_effect=min_effect, min_gain=min_gain)
            for name, delta in deltas.items()}
    order = {kind: rank for rank, kind in enumerate(VERDICTS)}
    goes = [v for v in each.values() if v["kind"] in GOES]
    if len(goes) == len(each):
        decided = max(goes, key=lambda v: order[v["kind"]])  # the weaker go
    else:
        stopping = [v for v in each.values() if v["kind"] not in GOES]
        decided = min(stopping, key=lambda v: order[v["kind"]] if v["kind"] != "undecided"
                      else -1)  # undecided first: it claims least
    kind, text = decided["kind"], decided["text"]
    if len(each) > 1:
        others = [f"against {name}: {v['kind']} ({v['delta_text']})"
                  for name, v in each.items() if v is not decided]
        text += " " + "; ".join(others).capitalize() + "."
    if kind == VERDICTS[4] and predicted_4x and prompting_value is not None and gain:
        text += (f" At 4x the data ({predicted_4x['n']} examples) it is predicted at "
                 f"{predicted_4x['value']:.3g} against prompting's {prompting_value:.3g}.")
    if kind == VERDICTS[3] and target:
        text += " " + _target_text(target)
    if distrust:
        kind = VERDICTS[2]
        reasons = "; ".join(f"{r['run']}: {r['text']}" for r in distrust)
        fixes = "; ".join(dict.fromkeys(r["fix"] for r in distrust))
        text = (f"Undecided: the tuned runs cannot be trusted ({reasons}). Fix: {fixes}. "
                f"What the numbers alone would say: {text}")
    numbers = {"metric": metric, "n_test": n_test, "min_effect": min_effect,
               "min_gain": min_gain,
               "deltas": {name: {"value": d["value"], "ci": d.get("ci")}
                          for name, d in deltas.items()},
               "gain_per_doubling": gain["value"] if gain else None,
               "gain_per_doubling_ci": gain.get("ci") if gain else None,
               "distrust": list(distrust)}
    # the verdict's own comparison (kept for readers of the first assess.json layout)
    numbers["delta"] = deltas[decided["arm"]]["value"]
    numbers["delta_ci"] = deltas[decided["arm"]].get("ci")
    return {"kind": kind, "text": text, "against": decided["arm"], "numbers": numbers,
            "by_arm": {name: v["kind"] for name, v in each.items()}}


def _against(arm: str, delta: dict, gain: dict | None, *, metric: str, n_test: int,
             min_effect: float, min_gain: float) -> dict:
    low, high = delta["ci"] if delta.get("ci") else (None, None)
    gain_ci = gain["ci"] if gain and gain.get("ci") else None
    d = f"tuned − {arm} = {delta['value']:+.3g}" + (
        f" [{low:+.3g}, {high:+.3g}]" if low is not None else " (no interval)")
    g = "" if not gain else f"gain per doubling {gain['value']:+.3g}" + (
        f" [{gain_ci[0]:+.3g}, {gain_ci[1]:+.3g}]" if gain_ci else " (no interval)")
    if low is not None and low > 0 and gain_ci and gain_ci[0] > min_gain:
        kind = VERDICTS[0]
        text = (f"Fine-tune, and more data pays: {metric} {d} on {n_test} test examples; "
                f"{g} (above {min_gain:g}).")
    elif low is not None and low > 0:
        kind = VERDICTS[1]
        text = (f"Fine-tune: it beats {arm}; {metric} {d} on {n_test} test examples."
                + (f" More data is not shown to pay: {g}." if g else ""))
    elif low is None or high >= min_effect:
        kind = VERDICTS[2]
        text = (f"Undecided, evaluate on more test examples: {metric} {d} on {n_test} test "
                f"examples" + (_more_examples(low, high, n_test, min_effect)
                               if low is not None else "") + ".")
    elif gain_ci and gain_ci[1] < min_gain:
        kind = VERDICTS[3]
        text = (f"Not worth it yet: no gain over {arm} ({metric} {d}, below {min_effect:g}) "
                f"and a flat curve ({g}, below {min_gain:g}).")
    else:
        kind = VERDICTS[4]
        text = (f"Prompting is enough: {metric} {d} on {n_test} test examples (no gain of "
                f"{min_effect:g} or more)." + (f" The curve is not shown to be flat: {g}."
                                               if g else ""))
    return {"arm": arm, "kind": kind, "text": text, "delta_text": d}


def _target_text(target: dict) -> str:
    if target.get("reachable"):
        ci = target.get("ci") or [None, None]
        high = "∞" if ci[1] is None else f"{ci[1]:.0f}"
        return (f"The fit says {target['target']:g} needs about {target['n']} examples "
                f"(up to {high}).")
    return f"Target {target['target']:g}: {target.get('note') or 'not reachable'}."


def _more_examples(low: float, high: float, n_test: int, min_effect: float) -> str:
    """How many test examples would narrow the interval to ±min_effect/2 (intervals shrink as
    1/sqrt(n))."""
    half_width = (high - low) / 2
    wanted = math.ceil(n_test * (half_width / (min_effect / 2)) ** 2)
    return (f"; the interval includes 0 and gains up to {high:+.3g}: about {wanted} test examples "
            f"would narrow it to ±{min_effect / 2:g}")
