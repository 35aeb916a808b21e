"""Learning-curve fits: a form that saturates, chosen on the points, with checked intervals.

``fit_curve(n_examples, values, ...)`` fits the metric of a learning curve (one value per
training-set size) with one of these forms, in ``x = log2(n)``:

- ``line``: ``y = a + b·x``, the old log-linear fit, kept as a fallback;
- ``logit``: ``logit((y − floor)/(ceiling − floor)) = a + b·x``, for metrics bounded on both
  sides: it accelerates while low, levels off toward the best value, and never passes it;
- ``power-to-best``: ``|best − y| = A·n^(−α)``, the plain power law of the distance to the
  metric's best value (the error rate of an accuracy; a loss itself, whose best is 0);
- ``power``: ``y = c − A·n^(−α)`` (losses: ``c + A·n^(−α)``), the power law toward an asymptote
  ``c`` found from the points, never past the best value (c ≤ ceiling; for losses c ≥ floor).

The form is chosen on the points themselves: the smallest leave-one-out error (each fraction
predicted by the form fitted to the others, in metric units), a form with three parameters
paying 10% over one with two. Nothing held out is looked at.

Intervals count what moves a prediction, because any one part alone was too narrow on
published curves (``benchmarks/assess_calibration.py`` measures how often they hold):

1. the caller's resampling (``resampled``: the metric of every fraction on each of R
   hierarchical bootstrap resamples, test examples and training seeds drawn together): the
   chosen form is refitted to each resampled curve;
2. the fit's misfit: Gaussian noise of the residuals' size, less what the resampling noise
   already explains, is added to each curve before the refit (in the form's own space, its
   scale drawn from χ² with ν = points − parameters degrees of freedom: few points, t tails);
3. the extrapolation error: the form fitted to the first points only, its error on the later
   ones (a backtest on the points), per doubling past the points it saw, beyond what the
   resampling noise explains, moves each draw by that much per doubling past the last point;
4. the rival forms, whose leave-one-out error is within twice the chosen one's, and the
   free-asymptote power law always (a few points cannot rule out an earlier plateau): each
   draw is moved by one rival's prediction minus the chosen form's.

A prediction of what a run would measure adds the misfit noise once more for the new point,
and ``seed_sd`` (one run's spread over training seeds) where the caller knows it. Without
``resampled`` the intervals rest on parts 2–4 alone; with as many points as parameters and no
resampling there is nothing to measure them on, and no interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from tunelab.eval.stats import resampled_curve

N_BAND = 24
N_DRAWS = 1000  # misfit draws when the caller has no resampled curves
# The least degrees of freedom the backtest's extrapolation error is scaled with (see _Fit.make).
MIN_CHECK_DOF = 3
ALPHAS = np.geomspace(0.01, 4.0, 160)  # the exponents the power form searches
EXTRA_PARAMETER_PENALTY = 0.10  # on the leave-one-out error, per parameter beyond two
EDGE = 1e-3  # transformed forms keep values this share of the range inside the bounds
# Forms whose leave-one-out error is within this factor of the chosen one's are its rivals:
# the intervals spread over their predictions too (the points hardly tell them apart).
RIVAL_FACTOR = 2.0
MIN_POINTS_CHECKED = 4  # below this the misfit of a two-parameter form is hardly measured


# --- the metric, oriented ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """The metric turned so that higher is better (``g = sign·y``), with its best and worst
    values in that orientation (None: unbounded on that side)."""

    sign: float
    best: float | None
    worst: float | None

    @classmethod
    def of(cls, ceiling: float | None, floor: float | None, lower_is_better: bool) -> Bounds:
        sign = -1.0 if lower_is_better else 1.0
        best, worst = (floor, ceiling) if lower_is_better else (ceiling, floor)
        return cls(sign, None if best is None else sign * best,
                   None if worst is None else sign * worst)

    def clip(self, g: np.ndarray) -> np.ndarray:
        return np.clip(g, -np.inf if self.worst is None else self.worst,
                       np.inf if self.best is None else self.best)


# --- the forms --------------------------------------------------------------------------------


class Form:
    """A learning-curve form fitted in its own space ``t = to_fit(g)`` over ``x = log2(n)``;
    every method works on many curves at once (rows)."""

    name = ""
    n_params = 2
    describe = ""

    def __init__(self, bounds: Bounds):
        self.bounds = bounds

    def applies(self) -> bool:
        return True

    def to_fit(self, g: np.ndarray) -> np.ndarray:
        return g

    def from_fit(self, t: np.ndarray) -> np.ndarray:
        return t

    def fit(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Least-squares parameters [R, p] of the curves ``t`` [R, F] at ``x`` [F]."""
        raise NotImplementedError

    def curve(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The fitted curves [R, K] (fit space) at ``x`` [K]."""
        raise NotImplementedError

    def examples_for(self, params: np.ndarray, target_g: float) -> np.ndarray:
        """Training examples [R] at which each curve reaches ``target_g``; inf where never."""
        raise NotImplementedError

    def named(self, params: np.ndarray) -> dict:
        """One curve's parameters by name, in the metric's own orientation."""
        raise NotImplementedError


class _Straight(Form):
    """``to_fit(g) = a + b·x``: a straight line in the form's space, fitted in closed form."""

    rising = 1.0  # the sign of b on an improving curve

    def fit(self, x, t):
        centred = x - x.mean()
        slope = t @ centred / (centred @ centred)
        return np.stack([t.mean(axis=1) - slope * x.mean(), slope], axis=1)

    def curve(self, params, x):
        return params[:, :1] + params[:, 1:] * x[None, :]

    def examples_for(self, params, target_g):
        intercept, slope = params[:, 0], params[:, 1]
        level = self.to_fit(np.asarray([target_g]))[0]
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            n = np.exp2((level - intercept) / slope)
        return np.where(slope * self.rising > 0, n, np.inf)


class Line(_Straight):
    name = "line"
    describe = "y = a + b·log2(n), straight in log2(n): never levels off"

    def named(self, params):
        sign = self.bounds.sign
        return {"intercept": sign * float(params[0]), "gain_per_doubling": sign * float(params[1])}


class Logit(_Straight):
    name = "logit"
    describe = ("logit((y − floor)/(ceiling − floor)) = a + b·log2(n): rises faster while low, "
                "levels off toward the best value")

    def applies(self):
        return self.bounds.best is not None and self.bounds.worst is not None

    def to_fit(self, g):
        share = (g - self.bounds.worst) / (self.bounds.best - self.bounds.worst)
        share = np.clip(share, EDGE, 1 - EDGE)
        return np.log(share / (1 - share))

    def from_fit(self, t):
        share = np.exp(-np.logaddexp(0.0, -t))  # 1 / (1 + e^-t) without overflow
        return self.bounds.worst + (self.bounds.best - self.bounds.worst) * share

    def named(self, params):
        return {"logit_intercept": float(params[0]), "logit_per_doubling": float(params[1])}


class PowerToBest(_Straight):
    name = "power-to-best"
    describe = ("|best − y| = A·n^(−α): the distance to the metric's best value shrinks as a "
                "power of the examples")
    rising = -1.0

    def applies(self):
        return self.bounds.best is not None

    def to_fit(self, g):
        span = 1.0 if self.bounds.worst is None else self.bounds.best - self.bounds.worst
        return np.log(np.maximum(self.bounds.best - g, EDGE * EDGE * span))

    def from_fit(self, t):
        return self.bounds.best - np.exp(t)

    def named(self, params):
        return {"best": self.bounds.sign * self.bounds.best, "A": float(np.exp(params[0])),
                "alpha": float(-params[1] / math.log(2))}


class Power(Form):
    name = "power"
    n_params = 3
    describe = ("y = c − A·n^(−α) (losses: c + A·n^(−α)): levels off at an asymptote c found "
                "from the points, never past the best value")

    def fit(self, x, t):
        return _fit_power(x, t, self.bounds.best)

    def curve(self, params, x):
        return params[:, :1] - params[:, 1:2] * np.exp2(-params[:, 2:3] * x[None, :])

    def examples_for(self, params, target_g):
        asymptote, scale, alpha = params.T
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            n = (scale / (asymptote - target_g)) ** (1 / alpha)
        return np.where((scale > 0) & (asymptote > target_g), n, np.inf)

    def named(self, params):
        return {"asymptote": self.bounds.sign * float(params[0]), "A": float(params[1]),
                "alpha": float(params[2])}


FORMS = (Logit, PowerToBest, Line, Power)  # ties in the choice go to the earlier form


def _fit_power(x: np.ndarray, g: np.ndarray, best: float | None) -> np.ndarray:
    """``g ≈ c − A·2^(−α·x)`` with A ≥ 0 and c ≤ best, for every row of ``g`` [R, F]: for each α
    of ALPHAS the model is linear in (c, A), solved in closed form (on a boundary of the
    constraints where the free solution breaks one), then the α with the least error."""
    m = np.exp2(-np.outer(ALPHAS, x))  # [G, F]
    g_mean = g.mean(axis=1, keepdims=True)
    m_mean = m.mean(axis=1)
    m_centred = m - m_mean[:, None]
    smm = (m_centred ** 2).sum(axis=1)
    cross = (g - g_mean) @ m_centred.T  # [R, G]
    scale = -cross / smm
    asymptote = g_mean + scale * m_mean
    ssr = ((g - g_mean) ** 2).sum(axis=1, keepdims=True) - cross ** 2 / smm
    free = (scale >= 0) & (asymptote <= (np.inf if best is None else best))
    flat = g_mean if best is None else np.minimum(g_mean, best)  # A = 0
    flat_ssr = ((g - flat) ** 2).sum(axis=1, keepdims=True)
    ssr = np.where(free, ssr, flat_ssr)
    asymptote = np.where(free, asymptote, flat)
    scale = np.where(free, scale, 0.0)
    if best is not None:  # c = best, the boundary where the asymptote is the best value
        distance = best - g
        smd = distance @ m.T
        scale_best = np.maximum(smd / (m ** 2).sum(axis=1), 0.0)
        ssr_best = ((distance ** 2).sum(axis=1, keepdims=True) - 2 * scale_best * smd
                    + scale_best ** 2 * (m ** 2).sum(axis=1))
        use = ~free & (ssr_best < ssr)
        ssr = np.where(use, ssr_best, ssr)
        asymptote = np.where(use, best, asymptote)
        scale = np.where(use, scale_best, scale)
    pick = ssr.argmin(axis=1)
    rows = np.arange(len(g))
    return np.stack([asymptote[rows, pick], scale[rows, pick], ALPHAS[pick]], axis=1)


# --- choosing the form ------------------------------------------------------------------------


def leave_one_out_rmse(form: Form, x: np.ndarray, g: np.ndarray) -> float:
    """RMS error (metric units) of each point predicted by ``form`` fitted to the others."""
    errors = []
    for left_out in range(len(x)):
        keep = np.arange(len(x)) != left_out
        params = form.fit(x[keep], form.to_fit(g[keep])[None, :])
        predicted = form.from_fit(form.curve(params, x[[left_out]]))[0, 0]
        errors.append(predicted - g[left_out])
    return float(np.sqrt(np.mean(np.square(errors))))


def choose_form(x: np.ndarray, g: np.ndarray, bounds: Bounds) -> tuple[Form, dict, list[Form]]:
    """The form with the least leave-one-out error (10% more per extra parameter) among those
    the bounds allow and the points can check (a point more than parameters for the fit, and
    enough left after leaving one out), the line where none can be checked; its description;
    and its rivals (itself first): the forms whose error is within RIVAL_FACTOR of its own,
    and the free-asymptote power law wherever it applies."""
    rows = []
    for kind in FORMS:
        form = kind(bounds)
        if not form.applies() or len(x) < form.n_params + 1:
            continue
        loo = leave_one_out_rmse(form, x, g)
        fitted = form.from_fit(form.curve(form.fit(x, form.to_fit(g)[None, :]), x))[0]
        rows.append((loo * (1 + EXTRA_PARAMETER_PENALTY * (form.n_params - 2)), form, {
            "name": form.name, "n_params": form.n_params, "loo_rmse": loo,
            "residual_rmse": float(np.sqrt(np.mean((fitted - g) ** 2)))}))
    if not rows:
        line = Line(bounds)
        return line, {"name": "line", "why": f"{len(x)} points: too few to compare forms; "
                      "the line through them", "describe": Line.describe, "candidates": [],
                      "rivals": []}, [line]
    _, form, chosen = min(rows, key=lambda row: row[0])
    rivals = [form] + [f for _, f, info in rows if f is not form and (
        isinstance(f, Power) or info["loo_rmse"] <= RIVAL_FACTOR * chosen["loo_rmse"])]
    scores = ", ".join(f"{info['name']} {info['loo_rmse']:.3g}" for _, _, info in rows)
    why = (f"least leave-one-out error (RMS, metric units) over the {len(x)} points: {scores}"
           + ("; a three-parameter form pays 10% more" if any(
               f.n_params > 2 for _, f, _ in rows) else ""))
    return form, {"name": form.name, "why": why, "describe": form.describe,
                  "candidates": [info for _, _, info in rows],
                  "rivals": [f.name for f in rivals[1:]]}, rivals


# --- the entry point --------------------------------------------------------------------------


def fit_curve(n_examples: Sequence[float], values: Sequence[float], *,
              resampled: np.ndarray | None = None, ceiling: float | None = 1.0,
              floor: float | None = 0.0, lower_is_better: bool = False,
              target: float | None = None, confidence: float = 0.95,
              test_se: Sequence[float] | None = None, seed_sd: float | None = None,
              predict_at: Sequence[float] = (), seed: int = 0) -> dict:
    """The learning curve's fit (form chosen on the points), gain per doubling, predictions at
    2x and 4x the largest size, a band, the examples needed for ``target``, the persistence and
    two-point predictions beside it, and flags; a JSON-ready dict.

    ``resampled`` [R, F]: the metric of each fraction on R hierarchical bootstrap resamples;
    ``test_se``: per-fraction standard error over test examples (for the drop flag);
    ``seed_sd``: one run's spread over training seeds, added to predictions of what a run
    measures; ``predict_at``: more sizes to predict (``"at"``, like ``"predicted"``);
    ``seed``: the draws' generator. ``gain_per_doubling`` is in metric units
    with the metric's sign (a loss that falls has a negative gain).
    """
    n, y, resampled = _checked(n_examples, values, resampled, test_se)
    bounds = Bounds.of(ceiling, floor, lower_is_better)
    x, g = np.log2(n), bounds.clip(bounds.sign * y)
    form, choice, rivals = choose_form(x, g, bounds)
    fit = _Fit.make(rivals, x, g, None if resampled is None else bounds.sign * resampled,
                    seed_sd=seed_sd, rng=np.random.default_rng(seed))
    largest = float(n[-1])

    def at(size: float) -> dict:
        point, draws = fit.measured(np.asarray([math.log2(size)]))
        return {"n": int(round(size)), "value": bounds.sign * float(point[0]),
                "ci": fit.interval(bounds.sign * draws[:, 0], confidence)}

    gain_point, gain_draws = fit.change(math.log2(largest), math.log2(2 * largest))
    result = {
        "form": {**choice, "interval": fit.method(resampled is not None)},
        "params": form.named(fit.params), "residual_rmse": fit.residual_rmse(),
        "dof": fit.dof,
        "gain_per_doubling": {"value": bounds.sign * gain_point,
                              "ci": fit.interval(bounds.sign * gain_draws, confidence)},
        "predicted": {"2x": at(2 * largest), "4x": at(4 * largest)},
        "band": [at(size) for size in np.geomspace(n[0], 4 * largest, N_BAND)],
        "at": [at(float(size)) for size in predict_at],
        "persistence": _persistence(y, largest, resampled, test_se, seed_sd, confidence, seed),
        "two_point": _two_point(n, y, resampled, bounds, confidence),
        "flags": _flags(n, y, g, fit, bounds, resampled, test_se),
        "confidence": confidence,
        "n_resamples": 0 if resampled is None else len(resampled),
        "n_draws": len(fit.draw_params), "seed": seed,
    }
    if target is not None:
        result["target"] = _target(target, fit, bounds, confidence)
    return result


def _checked(n_examples, values, resampled, test_se):
    """The inputs as arrays sorted by size, or a ValueError that says what is wrong."""
    n = np.asarray(n_examples, dtype=float)
    y = np.asarray(values, dtype=float)
    if n.ndim != 1 or n.shape != y.shape or len(n) < 2:
        raise ValueError("a learning curve needs at least two (n_examples, value) pairs")
    if np.any(n <= 0) or len(np.unique(n)) != len(n) or not np.all(np.isfinite(y)):
        raise ValueError("n_examples must be distinct and positive, values finite")
    order = np.argsort(n)
    if resampled is not None:
        resampled = np.asarray(resampled, dtype=float)
        if resampled.ndim != 2 or resampled.shape[1] != len(n) or len(resampled) < 2:
            raise ValueError(f"resampled must be [R, {len(n)}] (one column per fraction), "
                             f"not {resampled.shape}")
        resampled = resampled[:, order]
    if test_se is not None and len(test_se) != len(n):
        raise ValueError(f"test_se has {len(test_se)} entries for {len(n)} fractions")
    return n[order], y[order], resampled


@dataclass
class _Fit:
    """The chosen form fitted to the points, and refitted to every noisy draw of them."""

    form: Form
    x: np.ndarray
    g: np.ndarray
    params: np.ndarray  # [p], the point fit
    residual_sd: float  # in fit space, over dof degrees of freedom
    dof: int
    sigma: np.ndarray  # [D]: each draw's misfit scale
    draw_params: np.ndarray  # [D, p]
    drift: np.ndarray  # [D]: each draw's extrapolation error per doubling past the points
    backtest: dict
    rivals: list[tuple[Form, np.ndarray]]  # the rival forms and their point fits
    rival_of_draw: np.ndarray  # [D]: which rival's prediction each draw is moved to
    seed_sd: float | None
    rng: np.random.Generator

    @classmethod
    def make(cls, rivals: list[Form], x: np.ndarray, g: np.ndarray,
             resampled_g: np.ndarray | None, *, seed_sd: float | None,
             rng: np.random.Generator) -> _Fit:
        """``rivals[0]`` fitted to the points and to each draw: the resampled curves (or copies
        of the points) with the misfit noise that the resampling does not explain; each draw
        also gets an extrapolation error and one rival (uniformly)."""
        form = rivals[0]
        t = form.to_fit(g)
        params = form.fit(x, t[None, :])[0]
        dof = len(x) - form.n_params
        ssr = float(_ssr(form, params[None, :], x, t[None, :])[0])
        residual_sd = math.sqrt(ssr / dof) if dof > 0 else 0.0
        base = (np.repeat(g[None, :], N_DRAWS, axis=0) if resampled_g is None
                else form.bounds.clip(resampled_g))
        explained_sd = 0.0 if resampled_g is None else _explained_sd(form, x, base, ssr, dof)
        misfit_sd = math.sqrt(max(residual_sd ** 2 - explained_sd ** 2, 0.0))
        sigma = (misfit_sd * np.sqrt(dof / rng.chisquare(dof, size=len(base)))
                 if dof > 0 else np.zeros(len(base)))
        noisy = form.to_fit(base) + sigma[:, None] * rng.standard_normal(base.shape)
        checked = backtest(form, x, t, explained_sd)
        # the backtest's excess error per doubling, scaled by its own uncertainty (χ² over
        # its checks, at least MIN_CHECK_DOF: over one or two checks a χ² scale's tail is
        # nearly unbounded and the interval would say nothing)
        checks = max(checked["n_checks"], MIN_CHECK_DOF)
        drift = (checked["excess_per_doubling"]
                 * np.sqrt(checks / rng.chisquare(checks, size=len(base))))
        rival_fits = [(rival, rival.fit(x, rival.to_fit(g)[None, :])[0]) for rival in rivals]
        return cls(form, x, g, params, residual_sd, dof, sigma, form.fit(x, noisy), drift,
                   {**checked, "explained_sd": explained_sd, "misfit_sd": misfit_sd},
                   rival_fits, rng.integers(0, len(rivals), size=len(base)), seed_sd, rng)

    @property
    def has_interval(self) -> bool:
        return self.dof > 0 or self.draws_vary

    @property
    def draws_vary(self) -> bool:
        return bool(np.ptp(self.draw_params, axis=0).max() > 0)

    def measured(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What a run would measure at ``x`` [K] (goodness): the point [K] and draws [D, K],
        each draw with the misfit noise of a new point (and the seed spread) added."""
        form = self.form
        point = form.from_fit(form.curve(self.params[None, :], x))[0]
        curves = self._drifted(x)
        curves = curves + self.sigma[:, None] * self.rng.standard_normal(curves.shape)
        draws = form.from_fit(curves) + self._rival_shift(x)
        if self.seed_sd:
            draws = draws + self.rng.normal(0.0, self.seed_sd, draws.shape)
        return form.bounds.clip(point), form.bounds.clip(draws)

    def change(self, x_from: float, x_to: float) -> tuple[float, np.ndarray]:
        """The fitted curve's change from ``x_from`` to ``x_to`` (goodness): point and draws."""
        xs = np.asarray([x_from, x_to])
        form = self.form
        point = form.bounds.clip(form.from_fit(form.curve(self.params[None, :], xs))[0])
        draws = form.bounds.clip(form.from_fit(self._drifted(xs)) + self._rival_shift(xs))
        return float(point[1] - point[0]), draws[:, 1] - draws[:, 0]

    def _drifted(self, x: np.ndarray) -> np.ndarray:
        """The draws' curves at ``x`` (fit space), each moved past the last point by its own
        extrapolation error: the backtest's error per doubling times the distance."""
        past = np.maximum(x - self.x[-1], 0.0)[None, :]  # doublings past the last point
        shift = self.drift[:, None] * past * self.rng.standard_normal((len(self.drift), 1))
        return self.form.curve(self.draw_params, x) + shift

    def _rival_shift(self, x: np.ndarray) -> np.ndarray:
        """[D, K]: each draw moved by its rival's point prediction minus the chosen form's."""
        points = np.stack([rival.from_fit(rival.curve(params[None, :], x))[0]
                           for rival, params in self.rivals])
        return (points - points[0])[self.rival_of_draw]

    def interval(self, draws: np.ndarray, confidence: float) -> list[float] | None:
        if not self.has_interval:
            return None
        low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
        return [float(low), float(high)]

    def residual_rmse(self) -> float:
        fitted = self.form.from_fit(self.form.curve(self.params[None, :], self.x))[0]
        return float(np.sqrt(np.mean((fitted - self.g) ** 2)))

    def method(self, resampled: bool) -> str:
        """How the intervals were made, in one sentence, with this fit's numbers."""
        checks = self.backtest
        misfit = (f"misfit noise {checks['misfit_sd']:.3g} (the residual spread "
                  f"{self.residual_sd:.3g} in the {self.form.name} form's space less the "
                  f"{checks['explained_sd']:.3g} the resampling explains; χ² scale, "
                  f"{self.dof} degrees of freedom)" if self.dof > 0 else
                  "no misfit term (as many points as parameters)")
        source = ("each of the caller's resampled curves" if resampled
                  else f"{len(self.sigma)} copies of the points (no resampling: the fit's "
                  "misfit alone)")
        rivals = ", ".join(rival.name for rival, _ in self.rivals[1:])
        return (f"the {self.form.name} form refitted to {source} with {misfit} added; an "
                f"extrapolation error of {checks['excess_per_doubling']:.3g} per doubling past "
                f"the points (backtest over {checks['n_checks']} later points)"
                + (f"; draws spread over the rival forms ({rivals})" if rivals else "")
                + "; predictions of a measured value add the misfit noise once more"
                + (f" and the seed spread {self.seed_sd:.3g}" if self.seed_sd else ""))


def _ssr(form: Form, params: np.ndarray, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Residual sum of squares [R] (fit space) of each row's curve."""
    return ((t - form.curve(params, x)) ** 2).sum(axis=1)


def _explained_sd(form: Form, x: np.ndarray, base_g: np.ndarray, ssr: float, dof: int) -> float:
    """The residual spread (fit space) that the resampling noise alone produces: the mean
    residual sum of squares of the resampled curves' own fits beyond the points' own."""
    if dof < 1:
        return 0.0
    t = form.to_fit(base_g)
    resampled_ssr = _ssr(form, form.fit(x, t), x, t)
    return math.sqrt(max(float(resampled_ssr.mean()) - ssr, 0.0) / dof)


def backtest(form: Form, x: np.ndarray, t: np.ndarray, residual_sd: float,
             max_dropped: int = 3) -> dict:
    """How far the form goes wrong past its points, measured on them: fitted to the first
    points only (the last 1, 2, 3 left out while the form stays determined), its error (fit
    space) on the later ones per doubling beyond the points it saw. The RMS of those, the part
    that the points' own scatter (``residual_sd``) explains (a straight line's prediction
    variance), and the excess: the systematic error per doubling that predictions carry."""
    per_doubling, explained = [], []
    for dropped in range(1, max_dropped + 1):
        kept = len(x) - dropped
        if kept <= form.n_params:  # a fit through its points alone checks nothing but noise
            break
        params = form.fit(x[:kept], t[None, :kept])
        ahead = x[kept:] - x[kept - 1]
        per_doubling.extend((form.curve(params, x[kept:])[0] - t[kept:]) / ahead)
        seen = x[:kept]
        leverage = 1 / kept + (x[kept:] - seen.mean()) ** 2 / ((seen - seen.mean()) ** 2).sum()
        explained.extend(residual_sd ** 2 * (1 + leverage) / ahead ** 2)
    if not per_doubling:
        return {"error_per_doubling": 0.0, "explained_per_doubling": 0.0,
                "excess_per_doubling": 0.0, "n_checks": 0}
    total, noise = float(np.mean(np.square(per_doubling))), float(np.mean(explained))
    return {"error_per_doubling": math.sqrt(total), "explained_per_doubling": math.sqrt(noise),
            "excess_per_doubling": math.sqrt(max(total - noise, 0.0)),
            "n_checks": len(per_doubling)}


# --- around the fit ---------------------------------------------------------------------------


def _target(target: float, fit: _Fit, bounds: Bounds, confidence: float) -> dict:
    """Examples needed to reach ``target`` on the fitted curve (assess.py's fields)."""
    wanted = bounds.sign * target
    if bounds.best is not None and wanted > bounds.best:
        return {"target": target, "reachable": False, "n": None, "ci": None,
                "note": f"the target is beyond the metric's best value "
                        f"{bounds.sign * bounds.best:g}"}
    needed = float(fit.form.examples_for(fit.params[None, :], wanted)[0])
    ci = None
    if fit.has_interval:
        per_draw = fit.form.examples_for(fit.draw_params, wanted)
        # no interpolation between draws: two unreachable (infinite) ones make no NaN
        low, high = np.quantile(per_draw, [(1 - confidence) / 2, (1 + confidence) / 2],
                                method="inverted_cdf")
        ci = [_finite(low), _finite(high)]
    if not math.isfinite(needed):
        return {"target": target, "reachable": False, "n": None, "ci": ci,
                "note": f"not reachable on this curve: the fitted {fit.form.name} form levels "
                        "off before the target or does not rise"}
    return {"target": target, "reachable": True, "n": round(needed), "ci": ci,
            "note": None if ci is None or ci[1] is not None else
            "the interval's upper end is not reachable on this curve"}


def _persistence(y: np.ndarray, largest: float, resampled: np.ndarray | None, test_se,
                 seed_sd: float | None, confidence: float, seed: int) -> dict:
    """"No further gain": the largest fraction's value stands for every larger size."""
    ci = None
    if resampled is not None:
        draws = resampled[:, -1]
        if seed_sd:
            draws = draws + np.random.default_rng(seed).normal(0.0, seed_sd, len(draws))
        ci = [float(v) for v in np.quantile(draws, [(1 - confidence) / 2,
                                                    (1 + confidence) / 2])]
    elif test_se is not None:
        half = NormalDist().inv_cdf((1 + confidence) / 2) * math.hypot(test_se[-1], seed_sd or 0)
        ci = [float(y[-1] - half), float(y[-1] + half)]
    entry = {"value": float(y[-1]), "ci": ci}
    return {"n": int(round(largest)), **entry,
            "predicted": {label: {"n": int(round(k * largest)), **entry}
                          for label, k in (("2x", 2), ("4x", 4))}}


def _two_point(n: np.ndarray, y: np.ndarray, resampled: np.ndarray | None, bounds: Bounds,
               confidence: float) -> dict:
    """The line through the last two points in log2(n), continued to 2x and 4x."""
    step = math.log2(n[-1] / n[-2])
    low_q, high_q = (1 - confidence) / 2, (1 + confidence) / 2

    def metric_clip(v):
        return bounds.sign * bounds.clip(bounds.sign * np.asarray(v, dtype=float))

    slope = (y[-1] - y[-2]) / step
    slopes = None if resampled is None else (resampled[:, -1] - resampled[:, -2]) / step
    predicted = {}
    for label, k in (("2x", 2), ("4x", 4)):
        ci = None if slopes is None else [float(v) for v in np.quantile(
            metric_clip(resampled[:, -1] + slopes * math.log2(k)), [low_q, high_q])]
        predicted[label] = {"n": int(round(k * n[-1])),
                            "value": float(metric_clip(y[-1] + slope * math.log2(k))),
                            "ci": ci}
    return {"gain_per_doubling": {"value": float(slope), "ci": None if slopes is None else
                                  [float(v) for v in np.quantile(slopes, [low_q, high_q])]},
            "predicted": predicted}


def _flags(n: np.ndarray, y: np.ndarray, g: np.ndarray, fit: _Fit, bounds: Bounds,
           resampled: np.ndarray | None, test_se) -> list[dict]:
    """Drops beyond the test noise, curvature the chosen form cannot follow, too few points."""
    flags = []
    for i in range(len(n) - 1):
        if test_se is not None:
            se = max(float(test_se[i]), float(test_se[i + 1]))
        elif resampled is not None:
            se = float(np.std(bounds.sign * (resampled[:, i + 1] - resampled[:, i])))
        else:
            continue
        if g[i] - g[i + 1] > 2 * se > 0:
            flags.append({"kind": "drop", "text": (
                f"the metric got worse from {y[i]:.4g} at {n[i]:.0f} examples to {y[i + 1]:.4g} "
                f"at {n[i + 1]:.0f} ({y[i + 1] - y[i]:+.3g}), more than twice the test standard "
                f"error ({se:.2g}): a noisy or unstable run; more training seeds per fraction "
                "would tell which")})
    curvature = _curvature_flag(n, y, g, fit, bounds, resampled, test_se)
    if curvature:
        flags.append(curvature)
    if len(n) < MIN_POINTS_CHECKED or fit.dof < 1:
        flags.append({"kind": "too few points", "text": (
            f"{len(n)} points for a {fit.form.n_params}-parameter curve: its misfit is "
            + ("not measured at all, so the intervals hold the resampling noise only"
               if fit.dof < 1 else "measured on very few degrees of freedom (wide intervals)")
            + f"; {MIN_POINTS_CHECKED} or more fractions make the fit checkable")})
    return flags


def _curvature_flag(n, y, g, fit: _Fit, bounds: Bounds, resampled, test_se) -> dict | None:
    """A flag when the points bend (in log2 n) clearly the other way from the chosen form: the
    quadratic coefficient of the points beyond twice its noise, with the other sign."""
    x = fit.x
    if len(x) < 3:
        return None
    quadratic = np.linalg.pinv(np.vander(x - x.mean(), 3))[0]  # weights giving the x² coefficient
    observed = float(quadratic @ g)
    fitted = fit.form.from_fit(fit.form.curve(fit.params[None, :], x))[0]
    bend = float(quadratic @ fitted)
    if resampled is not None:
        noise = float(np.std(bounds.sign * resampled @ quadratic))
    elif test_se is not None:
        noise = float(np.sqrt(np.sum((quadratic * np.asarray(test_se)) ** 2)))
    elif len(x) > 3:
        residual = g - np.polyval(np.polyfit(x, g, 2), x)
        noise = float(np.sqrt(residual @ residual / (len(x) - 3)) * np.linalg.norm(quadratic))
    else:
        return None
    scale = max(abs(observed), 1e-12)
    form_sign = 0.0 if abs(bend) < 1e-6 * scale else math.copysign(1.0, bend)
    if abs(observed) <= 2 * noise or math.copysign(1.0, observed) == form_sign:
        return None
    gains = ", ".join(f"{d:+.3g}" for d in np.diff(y) / np.diff(x))
    shape = "accelerate" if observed > 0 else "level off"
    drawn = ("is straight" if form_sign == 0 else "bends the other way")
    return {"kind": "curvature", "text": (
        f"the points {shape} in log2(n) (gains per doubling {gains}) while the chosen "
        f"{fit.form.name} form {drawn}: its predictions beyond the points are "
        + ("too low" if observed > 0 else "too high") + " if that bend goes on")}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# --- resampling a measured curve ----------------------------------------------------------------


def hierarchical_resamples(values: Sequence[Sequence[float]], scores: Sequence[np.ndarray], *,
                           scale: float = 1.0, n_resamples: int = 1000,
                           seed: int = 0) -> np.ndarray:
    """The metric of each fraction on ``n_resamples`` hierarchical bootstrap resamples [R, F].

    ``values[f]``: each training seed's metric at fraction f; ``scores[f]``: [seeds, test
    examples] per-example scores (0..1) on the same test examples for every fraction. A
    resample draws test examples (one draw shared by every fraction and seed, since they are
    the same examples) and, within each fraction, seeds with replacement; a seed's metric on it
    is its value shifted by ``scale`` × the change of its mean score, and the fraction's metric
    is the mean over the drawn seeds. The resampling is ``eval.stats.resampled_curve``, the
    assessment's own, on scores shifted so that their mean is each seed's value.
    """
    fractions = []
    for seed_values, seed_scores in zip(values, scores, strict=True):
        per_seed = np.atleast_2d(np.asarray(seed_scores, dtype=float))
        # value + scale × (resampled mean − mean) is the resampled mean of these scores
        fractions.append([scale * row + (value - scale * row.mean())
                          for value, row in zip(seed_values, per_seed, strict=True)])
    return resampled_curve(fractions, n_resamples=n_resamples, seed=seed)
