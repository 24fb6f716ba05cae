"""The product's budget-aware ranking: typical tiles while labels are few, the project's
strategy as labels grow (numpy only).

The platform ranks with :func:`budgeted_rank` instead of calling a strategy directly:

* **no model yet** (``scores is None``): :func:`cold_start_rank` — TypiClust
  (``coldstart.typical_diverse``) on embeddings that need no labels (the project's
  self-supervised encoder, or a seeded randomly initialised one: ``ml_worker.ssl``), the
  labelled tiles covering their clusters; the rest of the pool by typicality;
* **a model and ``m`` labelled tiles**: the rule of ``adaptive`` (``AdaptiveStrategy``)
  applied to the project's strategy — a share ``clip((m - 8) / (24 - 8), 0, 1)`` of the batch
  is chosen by the strategy (``hybrid`` by default), the rest by ``typical`` on the model's
  embeddings with the labelled tiles *and* the strategy's picks covering their clusters; the
  rest of the pool follows in the strategy's order. From 24 labelled tiles on, the order is
  exactly the strategy's.

``random`` (the baseline) and the strategies with their own cold-start rule (``typical``,
``adaptive``) are used as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ml_worker.catalog import WARM_UP

__all__ = ["COLD_UNTIL", "WARM_FROM", "Ranked", "uncertain_share", "standardize", "cold_start_rank", "budgeted_rank",
           "uses_warm_up"]

#: labelled tiles up to which every pick is typical; from ``WARM_FROM`` on every pick is the
#: strategy's (the same priors as ``AdaptiveStrategy``; not fitted, see docs/active_learning.md).
#: Described to the platform by ``ml_worker.catalog.WARM_UP``.
COLD_UNTIL = int(WARM_UP["cold_until"])
WARM_FROM = int(WARM_UP["warm_from"])


@dataclass
class Ranked:
    """A ranking: ``order`` (a permutation of the candidates, the batch first), ``picked_by``
    (per position of ``order``: ``"typical"`` or the strategy's name), ``share`` (the fraction
    of the batch chosen by the strategy) and ``typicality`` ((n,) of the candidates, or None
    when the strategy ranked alone)."""

    order: list[int]
    picked_by: list[str]
    share: float
    typicality: np.ndarray | None = None

    @property
    def phase(self) -> str:
        """``"typical"`` (cold start), ``"mixed"`` or ``"model"`` (the strategy alone)."""
        return "typical" if self.share <= 0.0 else ("model" if self.share >= 1.0 else "mixed")


def uncertain_share(labelled: int, *, cold_until: int = COLD_UNTIL, warm_from: int = WARM_FROM) -> float:
    """The share of a batch the strategy chooses with ``labelled`` tiles labelled."""
    if not 0 <= cold_until < warm_from:
        raise ValueError("need 0 <= cold_until < warm_from")
    return float(np.clip((int(labelled) - cold_until) / (warm_from - cold_until), 0.0, 1.0))


def uses_warm_up(strategy: str) -> bool:
    """Does the product apply the typical warm-up to ``strategy``? Not to ``random`` (the
    baseline) nor to strategies with their own cold-start rule (``typical``, ``adaptive``)."""
    from ml_worker.active_learning.strategies import get_strategy

    get_strategy(strategy)  # ValueError naming the known ones
    return strategy not in WARM_UP["not_for"]


def standardize(embeddings: np.ndarray, labelled_embeddings: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Both sets z-scored per dimension with the statistics of all of them. Untrained and
    self-supervised encoders give non-negative pooled features that share one large common
    direction (cosine distances of 0.01 between different tissues); centring and scaling
    leave what tells the tiles apart."""
    emb = np.asarray(embeddings, dtype=np.float64)
    lab = None if labelled_embeddings is None or not len(labelled_embeddings) else np.asarray(
        labelled_embeddings, dtype=np.float64)
    both = emb if lab is None else np.concatenate([emb, lab])
    mean, std = both.mean(0), both.std(0)
    std = np.where(std > 1e-9, std, 1.0)
    return (emb - mean) / std, None if lab is None else (lab - mean) / std


def cold_start_rank(embeddings: np.ndarray, *, k: int, labelled_embeddings: np.ndarray | None = None,
                    seed: int = 0, standardise: bool = True) -> Ranked:
    """Before any model: the ``k`` typical tiles of the clusters no label covers (TypiClust on
    the :func:`standardize`-d embeddings; ``standardise=False``: on the raw ones, as
    ``al_sim``'s cold start), then every other candidate by decreasing typicality (stable: the
    order is a function of the embeddings and the seed)."""
    from ml_worker.active_learning.coldstart import typical_diverse_scored

    emb = np.asarray(embeddings, dtype=np.float64)
    n = emb.shape[0] if emb.ndim == 2 else 0
    if n == 0:
        return Ranked([], [], 0.0, np.zeros(0))
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or inf")
    lab = labelled_embeddings
    if standardise:
        emb, lab = standardize(emb, labelled_embeddings)
    picked, typ = typical_diverse_scored(emb, max(1, min(int(k), n)), labelled_embeddings=lab, seed=seed)
    chosen = set(picked)
    rest = [int(i) for i in np.argsort(-typ, kind="stable") if int(i) not in chosen]
    order = picked + rest
    return Ranked(order, ["typical"] * n, 0.0, typ)


def budgeted_rank(strategy: str, scores: Sequence[Mapping[str, float]], *, embeddings: np.ndarray,
                  labelled: int, k: int, labelled_embeddings: np.ndarray | None = None,
                  costs: np.ndarray | None = None, seed: int = 0) -> Ranked:
    """Rank candidates that a model scored (module docstring): the strategy's share of the
    batch by the strategy, the rest typical, then the strategy's order.

    Args:
        strategy: the project's strategy (``ml_worker.active_learning.STRATEGIES``).
        scores, embeddings, costs, labelled_embeddings, seed: as for ``rank``.
        labelled: how many tiles of the project are labelled (the switch's clock).
        k: the batch size.
    """
    from ml_worker.active_learning.coldstart import typical_diverse_scored
    from ml_worker.active_learning.strategies import rank

    n = len(scores)
    if n == 0:
        return Ranked([], [], 1.0)
    k_eff = max(1, min(int(k), n))
    if not uses_warm_up(strategy):
        order = rank(strategy, scores, embeddings=embeddings, costs=costs, k=k_eff, seed=seed,
                     labelled_embeddings=labelled_embeddings)
        return Ranked(order, [strategy] * n, 1.0)
    share = uncertain_share(labelled)
    n_unc = int(round(share * k_eff))
    base = rank(strategy, scores, embeddings=embeddings, costs=costs, k=n_unc if n_unc else k_eff, seed=seed,
                labelled_embeddings=labelled_embeddings)
    if n_unc >= k_eff:
        return Ranked(base, [strategy] * n, 1.0)
    emb = np.asarray(embeddings, dtype=np.float64)
    picked = base[:n_unc]
    lab = [np.asarray(labelled_embeddings, np.float64)] if labelled_embeddings is not None and len(
        labelled_embeddings) else []
    cover = np.concatenate(lab + [emb[picked]]) if (lab or picked) else None
    taken = set(picked)
    rest = [i for i in range(n) if i not in taken]
    typ_picks, typ_rest = typical_diverse_scored(emb[rest], k_eff - n_unc, labelled_embeddings=cover, seed=seed)
    typical = [rest[j] for j in typ_picks]
    typicality = np.zeros(n)
    typicality[rest] = typ_rest
    chosen = taken | set(typical)
    order = picked + typical + [i for i in base if i not in chosen]
    picked_by = [strategy] * len(picked) + ["typical"] * len(typical) + [strategy] * (n - len(picked) - len(typical))
    return Ranked(order, picked_by, share, typicality)
