"""Ranking the queue while labels are few (issue 16): typical and diverse tiles first.

* **No active model** (``run_ranking`` of a project whose strategy is not ``random``):
  :func:`rank_without_model` — the unlabelled tiles are embedded by the project's
  self-supervised encoder when ``ssl_pretrain`` is on and one has finished
  (``ml.ssl``), otherwise by a randomly initialised U-Net (width 8, weights drawn from the
  ranking seed: ``ml_worker.ssl.random_encoder_embeddings``), and ordered by
  ``ml_worker.active_learning.warmup.cold_start_rank`` (TypiClust: the most typical tile of
  each cluster no labelled tile covers, largest cluster first; then by typicality). The queue
  shows each tile's typicality relative to the most typical candidate (0..1).
* **A model and few labels**: :func:`rank_with_model` — ``warmup.budgeted_rank``: the
  project's strategy chooses a share ``clip((m - 8) / 16, 0, 1)`` of the batch (``m``
  labelled tiles), ``typical`` the rest; from 24 labelled tiles the strategy alone.

With ``ssl_pretrain`` on and no encoder yet, ranking without a model also starts the
pretraining (``services.maybe_start_pretraining``), which ranks the queue again when it
finishes. At most :data:`COLD_POOL_LIMIT` candidates (a seeded sample) are embedded; the rest
follow in a seeded random order with score 0.
"""
from __future__ import annotations

import numpy as np

from backend.images.models import Tile
from backend.images.pixels import read_tile_rgb
from backend.projects.models import Project

from .services import maybe_start_pretraining, ready_encoder

#: candidates embedded and ranked by typicality before the first model (the rest: seeded random)
COLD_POOL_LIMIT = 2000
#: labelled tiles embedded to mark their clusters as covered
LABELLED_LIMIT = 500


def _pixels(ids: list[int]) -> list[np.ndarray]:
    tiles = {t.pk: t for t in Tile.objects.filter(pk__in=ids).select_related("image", "project")}
    return [read_tile_rgb(tiles[i]) for i in ids]


def embed_without_model(*, project: Project, tile_ids: list[int], seed: int = 0) -> tuple[np.ndarray, dict]:
    """((n, D) embeddings of the tiles, where they came from) with no trained model: the
    project's finished SSL encoder, else the seeded random encoder."""
    pixels = _pixels(tile_ids)
    if not pixels:
        return np.zeros((0, 0), np.float32), {"features": "none"}
    encoder = ready_encoder(project=project)
    if encoder is not None:
        from ml_worker.ssl import ssl_embeddings

        from .ssl import local_checkpoint

        emb = ssl_embeddings(local_checkpoint(encoder), pixels, tile_size=project.tile_size)
        return emb, {"features": "ssl", "pretraining": encoder.pk, "sha256": encoder.checkpoint_sha256}
    from ml_worker.ssl import RANDOM_ENCODER, random_encoder_embeddings

    emb = random_encoder_embeddings(pixels, seed=seed, tile_size=project.tile_size)
    return emb, {"features": "random_encoder", "encoder": RANDOM_ENCODER["arch"],
                 "width": RANDOM_ENCODER["model_kwargs"]["width"], "seed": seed}


def rank_without_model(*, project: Project, pool: list[int], labelled: list[int], batch_size: int,
                       seed: int = 0) -> tuple[list[tuple[int, float]], dict]:
    """The first queue: ``[(tile id, typicality 0..1)]`` most worth labelling first, and what
    ranked it (``features`` and the rest of :func:`embed_without_model`'s description)."""
    from ml_worker.active_learning.warmup import cold_start_rank

    maybe_start_pretraining(project=project)
    rng = np.random.default_rng(seed)
    pool = list(pool)
    if len(pool) > COLD_POOL_LIMIT:
        chosen = set(rng.choice(len(pool), COLD_POOL_LIMIT, replace=False).tolist())
        ranked_ids = [t for i, t in enumerate(pool) if i in chosen]
        rest = [t for i, t in enumerate(pool) if i not in chosen]
    else:
        ranked_ids, rest = pool, []
    if len(labelled) > LABELLED_LIMIT:
        labelled = sorted(rng.choice(labelled, LABELLED_LIMIT, replace=False).tolist())
    if not ranked_ids:
        return [], {"features": "none"}
    emb, source = embed_without_model(project=project, tile_ids=ranked_ids + list(labelled), seed=seed)
    cand, lab = emb[: len(ranked_ids)], emb[len(ranked_ids):]
    ranked = cold_start_rank(cand, k=batch_size, labelled_embeddings=lab if len(lab) else None, seed=seed)
    typ = ranked.typicality
    top = float(typ.max()) if typ is not None and typ.size and typ.max() > 0 else 1.0
    ordered = [(ranked_ids[i], float(typ[i]) / top) for i in ranked.order]
    ordered += [(rest[i], 0.0) for i in rng.permutation(len(rest))]
    return ordered, source


def rank_with_model(*, strategy: str, scores: list[dict], embeddings: np.ndarray, costs: np.ndarray,
                    labelled_embeddings: np.ndarray | None, labelled: int, batch_size: int, seed: int = 0):
    """``warmup.budgeted_rank`` of the model's scores: (order, who picked each position, the
    strategy's share of the batch)."""
    from ml_worker.active_learning.warmup import budgeted_rank

    ranked = budgeted_rank(strategy, scores, embeddings=embeddings, costs=costs, k=batch_size, seed=seed,
                           labelled=labelled, labelled_embeddings=labelled_embeddings)
    return ranked.order, ranked.picked_by, ranked.share
