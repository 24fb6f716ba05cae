"""Active-learning selection strategies (numpy only).

A strategy turns the per-tile scores of a pool of unlabelled candidate tiles (the
``TileAnalysis.scores`` dicts from ``analyze_tile``) into an order: the tiles most worth
annotating first. Scores follow one convention: higher = more uncertain.

Registry :data:`STRATEGIES` (name -> configured instance):

==================  =========================================================================
``random``          seeded random permutation (the baseline)
``entropy``         mean pixel entropy, descending
``margin``          mean 1 - (p_top1 - p_top2), descending
``boundary``        mean entropy in a band around the predicted contours, descending
``mc_dropout``      MC-dropout variance of the nucleus probability (needs
                    ``analyze_tile(mc_samples>0)``)
``tta``             variance of the nucleus probability over flips / rot90 (needs
                    ``analyze_tile(tta=True)``)
``hybrid``          **default**: the top ``pool_factor·k`` (10·k) tiles by ``entropy``, thinned
                    to ``k`` by k-center greedy on the encoder embeddings (already-labelled
                    tiles count as centres); optional annotation-cost weighting
``hybrid_boundary`` the same with ``boundary`` as the uncertainty
``hybrid_rep``      the same pre-selection, thinned by greedy facility location
                    (representativeness, Yang et al. 2017) instead of k-center
``typical``         cold start: the most typical tile of each k-means cluster of the
                    embeddings that no label covers yet (TypiClust; reads no score)
``fixes``           expected nuclei to fix per minute of correction (``nuclei.fix_rate`` of
                    ``expected_fixes`` and the predicted nucleus count), one per k-means
                    cluster of the ``pool_factor·k`` best
``adaptive``        ``typical`` while labels are few, ``fixes`` once the model has learnt
                    something, mixed in between (the rule: :class:`AdaptiveStrategy`)
==================  =========================================================================

Why ``pool_factor = 10`` rather than the 3 of the classic recipe: on CPM-15 with few labels
(``python -m ml_worker.al_sim``, 64 px tiles) the most uncertain tiles are almost all the
same kind of nucleus-free neuropil texture, and a 3·k pool left k-center nothing else to
choose from: held-out Dice fell below random sampling's. See docs/ml_worker.md,
"Active learning", for the measured numbers.

:func:`rank` is the entry point used by the platform.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "Strategy",
    "RandomStrategy",
    "ScoreStrategy",
    "HybridStrategy",
    "TypicalStrategy",
    "FixesStrategy",
    "AdaptiveStrategy",
    "k_center_greedy",
    "facility_location_greedy",
    "cost_weighted",
    "strategy_names",
    "get_strategy",
    "rank",
]

DEFAULT_STRATEGY = "hybrid"

#: how to get a score that is missing, for the error message
_HOW_TO_GET = {
    "entropy": "analyze_tile() computes it",
    "margin": "analyze_tile() computes it",
    "boundary": "analyze_tile() computes it",
    "expected_fixes": "analyze_tile() computes it",
    "instance_flips": "run analyze_tile(..., tta=True)",
    "mc_dropout": "run analyze_tile(..., mc_samples>0) (e.g. mc_samples=8)",
    "mc_mutual_info": "run analyze_tile(..., mc_samples>0) (e.g. mc_samples=8)",
    "tta": "run analyze_tile(..., tta=True)",
}


class Strategy:
    """Base class: ``name``, ``required_scores`` (keys of the score dicts it reads) and
    :meth:`select`.

    ``select`` always returns a full permutation of ``range(len(scores))``, most valuable
    first; ``k`` (the batch size about to be labelled) only matters to strategies that
    build a batch jointly (``hybrid``).
    """

    name: str = ""
    required_scores: tuple[str, ...] = ()
    #: whether :meth:`select` needs ``embeddings``
    needs_embeddings: bool = False

    def select(
        self,
        scores: Sequence[Mapping[str, float]],
        *,
        embeddings: np.ndarray | None = None,
        costs: np.ndarray | None = None,
        k: int | None = None,
        seed: int = 0,
        labelled_embeddings: np.ndarray | None = None,
    ) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def score_vector(self, scores: Sequence[Mapping[str, float]], key: str) -> np.ndarray:
        """(n,) float64 of ``scores[i][key]``; ValueError when missing or not finite."""
        missing = [i for i, s in enumerate(scores) if key not in s or s[key] is None]
        if missing:
            how = _HOW_TO_GET.get(key, "compute it for every candidate")
            raise ValueError(
                f"strategy {self.name!r} needs the {key!r} score, missing for {len(missing)} of "
                f"{len(scores)} candidate(s) (first: #{missing[0]}); {how}"
            )
        v = np.array([float(s[key]) for s in scores], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            raise ValueError(f"score {key!r} is not finite for candidate #{int(bad[0])}: {v[bad[0]]}")
        return v

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _descending(v: np.ndarray) -> list[int]:
    """Indices by decreasing value; ties keep the input order (stable)."""
    return [int(i) for i in np.argsort(-v, kind="stable")]


class RandomStrategy(Strategy):
    """Seeded uniform random order (the baseline); reads no score."""

    def __init__(self, name: str = "random") -> None:
        self.name = name
        self.required_scores = ()

    def select(self, scores, *, embeddings=None, costs=None, k=None, seed=0, labelled_embeddings=None):
        return [int(i) for i in np.random.default_rng(seed).permutation(len(scores))]


class ScoreStrategy(Strategy):
    """Order by one score, most uncertain first (``entropy``, ``margin``, ``boundary``,
    ``mc_dropout``, ``tta``, ...). Ties keep the candidate order."""

    def __init__(self, name: str, key: str | None = None) -> None:
        self.name = name
        self.key = key or name
        self.required_scores = (self.key,)

    def select(self, scores, *, embeddings=None, costs=None, k=None, seed=0, labelled_embeddings=None):
        if not len(scores):
            return []
        return _descending(self.score_vector(scores, self.key))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def k_center_greedy(
    embeddings: np.ndarray,
    k: int,
    *,
    centers: np.ndarray | None = None,
    normalize: bool = True,
) -> list[int]:
    """Greedy k-center (farthest-first) selection (Sener & Savarese, ICLR 2018).

    Repeatedly picks the point farthest (Euclidean) from everything picked so far and from
    the existing ``centers`` (the embeddings of already-labelled tiles). Without centres the
    first pick is point 0 — callers order the points by uncertainty, so the most uncertain
    tile starts the batch. Ties on distance go to the lower index (= more uncertain).

    Args:
        embeddings: (n, D) points.
        k: number to pick (clipped to n).
        centers: (m, D) existing centres, or None.
        normalize: L2-normalise rows first (cosine geometry; pooled ReLU features differ
            a lot in scale between tiles).

    Returns:
        ``min(k, n)`` indices in pick order.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, D), got shape {x.shape}")
    n = x.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return []
    if normalize:
        x = _unit_rows(x)
    min_d = np.full(n, np.inf)
    if centers is not None:
        c = np.asarray(centers, dtype=np.float64)
        if c.ndim != 2 or (c.size and c.shape[1] != x.shape[1]):
            raise ValueError(f"labelled embeddings must be (m, {x.shape[1]}), got shape {c.shape}")
        if c.shape[0]:
            if normalize:
                c = _unit_rows(c)
            # Squared distances in chunks: (n, m) can be large for big labelled sets.
            for s in range(0, c.shape[0], 4096):
                cc = c[s : s + 4096]
                d = (x**2).sum(1)[:, None] - 2 * x @ cc.T + (cc**2).sum(1)[None]
                min_d = np.minimum(min_d, np.maximum(d, 0).min(axis=1))
    picked: list[int] = []
    taken = np.zeros(n, bool)
    for _ in range(k):
        if np.isinf(min_d).all():
            i = int(np.flatnonzero(~taken)[0])
        else:
            cand = np.where(taken, -1.0, min_d)
            i = int(np.argmax(cand))
        picked.append(i)
        taken[i] = True
        d = ((x - x[i]) ** 2).sum(1)
        min_d = np.minimum(min_d, d)
        min_d[taken] = -1.0
    return picked


def facility_location_greedy(
    embeddings: np.ndarray,
    candidates: Sequence[int],
    k: int,
    *,
    centers: np.ndarray | None = None,
) -> list[int]:
    """Greedy representativeness ("suggestive annotation", Yang et al., MICCAI 2017):
    pick, among ``candidates``, the ``k`` points that best *cover* all ``embeddings`` —
    maximise ``sum_x max_{s in S ∪ centers} max(0, cos(x, s))`` greedily (a monotone
    submodular facility-location objective, so greedy is within 1 - 1/e of optimal).
    Unlike k-center, which reaches for the farthest (often atypical) points, this prefers
    candidates that resemble many pool tiles and are not yet covered by the labelled ones.

    Returns:
        indices into ``embeddings`` (a subset of ``candidates``), in pick order.
    """
    x = _unit_rows(np.asarray(embeddings, dtype=np.float64))
    cand = np.asarray(list(candidates), dtype=np.int64)
    k = min(int(k), cand.size)
    if k <= 0:
        return []
    sim = np.clip(x @ x[cand].T, 0.0, None)  # (n, m)
    cover = np.zeros(x.shape[0])
    if centers is not None and len(centers):
        c = _unit_rows(np.asarray(centers, dtype=np.float64))
        if c.shape[1] != x.shape[1]:
            raise ValueError(f"labelled embeddings must be (m, {x.shape[1]}), got shape {c.shape}")
        cover = np.clip(x @ c.T, 0.0, None).max(axis=1)
    taken = np.zeros(cand.size, bool)
    picked: list[int] = []
    for _ in range(k):
        gain = np.maximum(sim - cover[:, None], 0.0).sum(axis=0)
        gain[taken] = -1.0
        j = int(np.argmax(gain))  # ties: the earlier (more uncertain) candidate
        taken[j] = True
        picked.append(int(cand[j]))
        cover = np.maximum(cover, sim[:, j])
    return picked


def cost_weighted(uncertainty: np.ndarray, costs: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Uncertainty per unit of expected annotation effort:
    ``u / (1 + alpha · cost / mean(cost))``.

    ``costs`` is typically the predicted nucleus count of each tile (every nucleus is a
    polygon to check); dividing by the mean makes ``alpha`` independent of tile size and
    tissue density (``alpha = 1``: a tile with an average count keeps half its score, one
    with ten times the average keeps 1/11). All-zero costs leave the scores unchanged.
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    if c.shape != u.shape:
        raise ValueError(f"costs has {c.size} values for {u.size} candidates")
    if not np.all(np.isfinite(c)) or (c < 0).any():
        raise ValueError("costs must be finite and non-negative")
    mean = c.mean() if c.size else 0.0
    if alpha <= 0 or mean <= 0:
        return u
    return u / (1.0 + alpha * c / mean)


class HybridStrategy(Strategy):
    """Uncertainty pre-selection + k-center greedy diversity (the default strategy).

    1. priority = ``scores[key]`` (optionally divided by the annotation cost, see
       :func:`cost_weighted`, when ``costs`` are given and ``cost_alpha > 0``);
    2. the ``pool_factor · k`` candidates with the highest priority are kept;
    3. k-center greedy on their L2-normalised embeddings, with the already-labelled tiles'
       embeddings as existing centres, picks ``k`` tiles that cover the pool (the first
       pick, without labelled centres, is the highest-priority tile) — or, with
       ``diversity="facility"``, :func:`facility_location_greedy` picks the ``k`` that best
       represent all candidates;
    4. the rest follow by decreasing priority.

    ``k=None`` (no batch size given): the whole pool is ordered farthest-first (step 3
    over all candidates). Pass ``k`` — the batch about to be annotated — to get the
    uncertainty-then-diversity behaviour.
    """

    needs_embeddings = True

    def __init__(self, name: str = "hybrid", key: str = "entropy", pool_factor: float = 10.0,
                 cost_alpha: float = 1.0, diversity: str = "kcenter") -> None:
        if pool_factor < 1:
            raise ValueError("pool_factor must be >= 1")
        if diversity not in ("kcenter", "facility"):
            raise ValueError(f"diversity must be 'kcenter' or 'facility', got {diversity!r}")
        self.diversity = diversity
        self.name = name
        self.key = key
        self.required_scores = (key,)
        self.pool_factor = float(pool_factor)
        self.cost_alpha = float(cost_alpha)

    def priority(self, scores: Sequence[Mapping[str, float]], costs: np.ndarray | None = None,
                 cost_alpha: float | None = None) -> np.ndarray:
        u = self.score_vector(scores, self.key)
        if costs is not None:
            u = cost_weighted(u, costs, self.cost_alpha if cost_alpha is None else cost_alpha)
        return u

    def select(self, scores, *, embeddings=None, costs=None, k=None, seed=0, labelled_embeddings=None,
               cost_alpha: float | None = None):
        n = len(scores)
        if n == 0:
            return []
        emb = _check_embeddings(self.name, embeddings, n)
        prio = self.priority(scores, costs, cost_alpha)
        by_prio = _descending(prio)
        if k is None:
            k_eff, m = n, n
        else:
            if int(k) < 0:
                raise ValueError(f"k must be >= 0, got {k}")
            k_eff = min(int(k), n)
            m = min(n, max(k_eff, int(math.ceil(self.pool_factor * k_eff))))
        pool = by_prio[:m]
        if self.diversity == "facility":
            picked = facility_location_greedy(emb, pool, k_eff, centers=labelled_embeddings)
        else:
            picked = [pool[j] for j in k_center_greedy(emb[pool], k_eff, centers=labelled_embeddings)]
        chosen = set(picked)
        return picked + [i for i in by_prio if i not in chosen]


def _check_embeddings(name: str, embeddings: np.ndarray | None, n: int) -> np.ndarray:
    if embeddings is None:
        raise ValueError(
            f"strategy {name!r} needs embeddings (n, D): stack TileAnalysis.embedding "
            "of the candidates (analyze_tile computes it)"
        )
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"embeddings must be ({n}, D) for {n} candidates, got shape {emb.shape}")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or inf")
    return emb


def _one_per_cluster(emb: np.ndarray, prio: np.ndarray, k: int, pool_factor: float, seed: int,
                     exclude: set[int] | None = None) -> list[int]:
    """The best-priority candidate of each of ``k`` k-means clusters of the ``pool_factor·k``
    best candidates, best first: a batch of high-value tiles that do not all look alike."""
    from ml_worker.active_learning.coldstart import kmeans

    exclude = exclude or set()
    by_prio = [i for i in _descending(prio) if i not in exclude]
    k = min(int(k), len(by_prio))
    if k <= 0:
        return []
    pool = by_prio[: max(k, int(math.ceil(pool_factor * k)))]
    labels, _ = kmeans(_unit_rows(emb[pool]), k, seed=seed)
    best: dict[int, int] = {}
    for j, i in enumerate(pool):  # pool is by decreasing priority: the first seen is the best
        best.setdefault(int(labels[j]), i)
    picked = sorted(best.values(), key=lambda i: -prio[i])
    if len(picked) < k:  # fewer distinct clusters than k: fill by priority
        chosen = set(picked)
        picked += [i for i in pool if i not in chosen][: k - len(picked)]
    return picked


class TypicalStrategy(Strategy):
    """Cold start (TypiClust): ``coldstart.typical_diverse`` on the embeddings, with the
    labelled tiles covering their clusters; the rest follow by typicality. Reads no score,
    so it works on the embeddings of any encoder (``ml_worker.ssl`` before the first model)."""

    needs_embeddings = True
    #: picks its own seed set before any model exists (``ml_worker.al_sim``)
    cold_start = True

    def __init__(self, name: str = "typical") -> None:
        self.name = name
        self.required_scores = ()

    def select(self, scores, *, embeddings=None, costs=None, k=None, seed=0, labelled_embeddings=None):
        from ml_worker.active_learning.coldstart import typical_diverse_scored

        n = len(scores) if scores is not None else 0
        if embeddings is not None and n == 0:
            n = len(embeddings)
        if n == 0:
            return []
        emb = _check_embeddings(self.name, embeddings, n)
        k_eff = n if k is None else min(int(k), n)
        picked, typ = typical_diverse_scored(emb, k_eff if k is not None else min(n, 64),
                                             labelled_embeddings=labelled_embeddings, seed=seed)
        chosen = set(picked)
        return picked + [i for i in _descending(typ) if i not in chosen]


class FixesStrategy(Strategy):
    """Expected nuclei to fix per minute of correction (``nuclei.fix_rate``: the
    ``expected_fixes`` score over the time to check the tile's ``costs`` = predicted nuclei
    and fix them), then one tile per k-means cluster of the ``pool_factor·k`` best
    (:func:`_one_per_cluster`); the rest by decreasing rate. Without ``costs`` only the
    fixes and the tile overhead count."""

    needs_embeddings = True

    def __init__(self, name: str = "fixes", key: str = "expected_fixes", pool_factor: float = 4.0) -> None:
        self.name = name
        self.key = key
        self.required_scores = (key,)
        self.pool_factor = float(pool_factor)

    def priority(self, scores: Sequence[Mapping[str, float]], costs: np.ndarray | None = None) -> np.ndarray:
        from ml_worker.active_learning.nuclei import fix_rate

        return fix_rate(self.score_vector(scores, self.key), None if costs is None else np.asarray(costs, float))

    def select(self, scores, *, embeddings=None, costs=None, k=None, seed=0, labelled_embeddings=None):
        n = len(scores)
        if n == 0:
            return []
        emb = _check_embeddings(self.name, embeddings, n)
        prio = self.priority(scores, costs)
        k_eff = n if k is None else min(int(k), n)
        picked = _one_per_cluster(emb, prio, k_eff, self.pool_factor, seed) if k is not None else []
        chosen = set(picked)
        return picked + [i for i in _descending(prio) if i not in chosen]


class AdaptiveStrategy(FixesStrategy):
    """Budget-aware switch from typical to uncertain tiles — the rule:

    with ``m`` tiles labelled (``len(labelled_embeddings)``), the share of the batch chosen by
    expected fixes (:class:`FixesStrategy`) is ``clip((m - cold_until) / (warm_from -
    cold_until), 0, 1)``; the rest of the batch is picked by ``typical`` (TypiClust), with the
    labelled tiles *and* the uncertain picks covering their clusters. Defaults: up to 8
    labelled tiles all typical, from 24 all by expected fixes. A young model's uncertainty
    points at what it has not seen at all (background it hallucinates on, rare artefacts);
    the typical tiles of unlabelled clusters teach more until the model has seen every kind
    of tissue once.
    """

    cold_start = True

    def __init__(self, name: str = "adaptive", key: str = "expected_fixes", pool_factor: float = 4.0,
                 cold_until: int = 8, warm_from: int = 24) -> None:
        super().__init__(name, key, pool_factor)
        if not 0 <= cold_until < warm_from:
            raise ValueError("need 0 <= cold_until < warm_from")
        self.cold_until, self.warm_from = int(cold_until), int(warm_from)

    def uncertain_share(self, labelled: int) -> float:
        return float(np.clip((labelled - self.cold_until) / (self.warm_from - self.cold_until), 0.0, 1.0))

    def select(self, scores, *, embeddings=None, costs=None, k=None, seed=0, labelled_embeddings=None):
        from ml_worker.active_learning.coldstart import typical_diverse_scored

        n = len(scores)
        if n == 0:
            return []
        emb = _check_embeddings(self.name, embeddings, n)
        prio = self.priority(scores, costs)
        m = 0 if labelled_embeddings is None else len(labelled_embeddings)
        k_eff = min(n, 64) if k is None else min(int(k), n)  # no batch size: a first batch of 64, then by rate
        n_unc = int(round(self.uncertain_share(m) * k_eff))
        picked = _one_per_cluster(emb, prio, n_unc, self.pool_factor, seed) if n_unc else []
        if len(picked) < k_eff:
            lab = [np.asarray(labelled_embeddings, float)] if m else []
            cover = np.concatenate(lab + [emb[picked]]) if (lab or picked) else None
            rest = [i for i in range(n) if i not in set(picked)]
            typ_picks, _ = typical_diverse_scored(emb[rest], k_eff - len(picked), labelled_embeddings=cover, seed=seed)
            picked += [rest[j] for j in typ_picks]
        chosen = set(picked)
        return picked + [i for i in _descending(prio) if i not in chosen]


#: name -> configured strategy instance
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        RandomStrategy("random"),
        ScoreStrategy("entropy"),
        ScoreStrategy("margin"),
        ScoreStrategy("boundary"),
        ScoreStrategy("mc_dropout"),
        ScoreStrategy("tta"),
        HybridStrategy("hybrid", key="entropy"),
        HybridStrategy("hybrid_boundary", key="boundary"),
        HybridStrategy("hybrid_rep", key="entropy", diversity="facility"),
        TypicalStrategy("typical"),
        FixesStrategy("fixes"),
        AdaptiveStrategy("adaptive"),
    )
}


def strategy_names() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """``STRATEGIES[name]``; ValueError listing the known names otherwise."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(strategy_names())}") from None


def rank(
    strategy: str,
    scores: Sequence[Mapping[str, float]],
    *,
    embeddings: np.ndarray | None = None,
    costs: np.ndarray | None = None,
    k: int | None = None,
    seed: int = 0,
    labelled_embeddings: np.ndarray | None = None,
    **options: Any,
) -> list[int]:
    """Order candidate tiles for annotation, most valuable first.

    Args:
        strategy: a name in :data:`STRATEGIES` (default strategy: ``"hybrid"``).
        scores: one dict per candidate (``TileAnalysis.scores``); higher = more uncertain.
        embeddings: (n, D) ``TileAnalysis.embedding`` stacked; needed by ``hybrid*``.
        costs: (n,) expected annotation cost (e.g. ``TileAnalysis.nucleus_count``); when
            given, ``hybrid*`` ranks by uncertainty per cost (:func:`cost_weighted`); the
            single-score strategies ignore it.
        k: size of the batch about to be labelled (``hybrid*`` picks these k jointly).
        seed: randomness (``random``).
        labelled_embeddings: (m, D) embeddings of the tiles already labelled — existing
            centres of the k-center greedy, so the batch goes where labels are not yet.
        **options: strategy-specific (``cost_alpha`` for ``hybrid*``).

    Returns:
        A permutation of ``range(len(scores))``; the first ``k`` are the batch to label.

    Raises:
        ValueError: unknown strategy (the message lists the known ones), a score the
            strategy needs was not computed (the message says which ``analyze_tile``
            option computes it), embeddings missing / of the wrong shape.
    """
    strat = get_strategy(strategy)
    return strat.select(
        list(scores),
        embeddings=embeddings,
        costs=costs,
        k=k,
        seed=seed,
        labelled_embeddings=labelled_embeddings,
        **options,
    )
