"""Cold start: typical and diverse tiles from embeddings alone (numpy only).

TypiClust (Hacohen, Dekel & Weinshall, ICML 2022): with very few labels, the tiles worth
labelling first are the *typical* ones of regions of the data that no label covers yet — not
the uncertain ones, which for a young model are mostly outliers and background it
hallucinates on. The pool (labelled + candidates) is split into ``|L| + k`` k-means clusters;
the clusters holding no labelled tile are visited largest first, and each gives its most
typical candidate, typicality being the inverse mean distance to the point's nearest
neighbours inside its cluster.

The embeddings can come from any encoder: a trained model's bottleneck, the self-supervised
encoder of ``ml_worker.ssl`` before the first model exists, or even a randomly initialised
one (random convolutional features still separate stain, density and texture).
"""

from __future__ import annotations

import numpy as np

__all__ = ["kmeans", "typicality", "typical_diverse"]


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None], 0.0)


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), centres (k, D)): Lloyd's k-means with k-means++ seeding (seeded RNG).
    ``k`` is clipped to the number of distinct points; empty clusters are re-seeded on the
    point farthest from its centre."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    k = max(1, min(int(k), n, len(np.unique(x.round(12), axis=0))))
    rng = np.random.default_rng(seed)
    centres = [x[int(rng.integers(n))]]
    d = _sqdist(x, np.array(centres))[:, 0]
    for _ in range(1, k):
        tot = d.sum()
        i = int(rng.choice(n, p=d / tot)) if tot > 0 else int(rng.integers(n))
        centres.append(x[i])
        d = np.minimum(d, _sqdist(x, x[i : i + 1])[:, 0])
    c = np.array(centres)
    labels = np.zeros(n, np.int64)
    for it in range(iters):
        dist = _sqdist(x, c)
        new = dist.argmin(1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(0)
            else:  # re-seed an empty cluster on the worst-served point
                far = int(dist[np.arange(n), labels].argmax())
                c[j] = x[far]
                labels[far] = j
    return labels, c


def typicality(x: np.ndarray, *, neighbours: int = 20) -> np.ndarray:
    """(n,) inverse mean Euclidean distance of each point to its ``neighbours`` nearest others
    (TypiClust's density); a lone point gets 0."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        return np.zeros(n)
    d = np.sqrt(_sqdist(x, x))
    np.fill_diagonal(d, np.inf)
    m = min(int(neighbours), n - 1)
    near = np.partition(d, m - 1, axis=1)[:, :m]
    return 1.0 / (near.mean(1) + 1e-12)


def typical_diverse(embeddings: np.ndarray, k: int, *, labelled_embeddings: np.ndarray | None = None,
                    seed: int = 0, neighbours: int = 20, max_clusters: int = 500) -> list[int]:
    """Indices of up to ``k`` candidates, in pick order: the most typical candidate of each
    cluster that no labelled tile covers, largest cluster first (module docstring). When
    fewer uncovered clusters have candidates than ``k``, the rest are the most typical
    remaining candidates of the clusters with the fewest labels per member.

    Args:
        embeddings: (n, D) candidates.
        k: batch size.
        labelled_embeddings: (m, D) tiles already labelled (they cover their clusters).
        max_clusters: cap on ``m + k`` clusters (k-means cost).
    """
    return typical_diverse_scored(embeddings, k, labelled_embeddings=labelled_embeddings, seed=seed,
                                  neighbours=neighbours, max_clusters=max_clusters)[0]


def typical_diverse_scored(embeddings: np.ndarray, k: int, *, labelled_embeddings: np.ndarray | None = None,
                           seed: int = 0, neighbours: int = 20,
                           max_clusters: int = 500) -> tuple[list[int], np.ndarray]:
    """(:func:`typical_diverse`'s picks, (n,) typicality of every candidate in its cluster)."""
    x = _unit(np.asarray(embeddings, dtype=np.float64))
    n = x.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return [], np.zeros(n)
    lab = np.zeros((0, x.shape[1]))
    if labelled_embeddings is not None and len(labelled_embeddings):
        lab = _unit(np.asarray(labelled_embeddings, dtype=np.float64))
        if lab.shape[1] != x.shape[1]:
            raise ValueError(f"labelled embeddings must be (m, {x.shape[1]}), got shape {lab.shape}")
    allx = np.concatenate([x, lab])
    n_clusters = min(len(allx), lab.shape[0] + k, int(max_clusters))
    labels, _ = kmeans(allx, n_clusters, seed=seed)
    cand_lab, lab_lab = labels[:n], labels[n:]
    covered = np.bincount(lab_lab, minlength=n_clusters) if lab_lab.size else np.zeros(n_clusters, np.int64)
    size = np.bincount(labels, minlength=n_clusters)
    typ = np.zeros(n)
    for c in range(n_clusters):
        members = np.flatnonzero(labels == c)
        cm = members[members < n]
        if cm.size:
            t = typicality(allx[members], neighbours=neighbours)
            typ[cm] = t[members < n]
    picked: list[int] = []
    taken = np.zeros(n, bool)
    # uncovered clusters, largest first; then by labels per member (least covered first)
    order = sorted(range(n_clusters), key=lambda c: (covered[c] > 0, covered[c] / max(size[c], 1), -size[c], c))
    while len(picked) < k:
        progressed = False
        for c in order:
            if len(picked) >= k:
                break
            members = np.flatnonzero((cand_lab == c) & ~taken)
            if not members.size:
                continue
            i = int(members[np.argmax(typ[members])])
            picked.append(i)
            taken[i] = True
            progressed = True
        if not progressed:
            break
    return picked, typ
