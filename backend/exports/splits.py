"""Train/val/test splits by image: seeded, reproducible, optionally stratified."""
from __future__ import annotations

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


def seeded_split(
    *, image_ids: list[int], fractions: dict[str, float], seed: int, strata: dict[int, str] | None = None
) -> dict[int, str]:
    """Image id -> split. All tiles of an image land in the same split.

    Images are shuffled with ``seed`` (within their stratum when ``strata`` is given, strata in
    sorted order) and dealt out one by one to the split furthest below its share so far, so each
    stratum, and the whole, follow ``fractions`` as closely as whole images allow. The same ids,
    fractions, seed and strata always give the same split.
    """
    names = [n for n in SPLIT_NAMES if fractions.get(n, 0) > 0] + sorted(
        n for n in fractions if n not in SPLIT_NAMES and fractions[n] > 0
    )
    total = sum(fractions[n] for n in names)
    shares = np.array([fractions[n] / total for n in names])
    rng = np.random.default_rng(seed)
    ordered: list[int] = []
    groups: dict[str, list[int]] = {}
    for image_id in sorted(image_ids):
        groups.setdefault((strata or {}).get(image_id, ""), []).append(image_id)
    for key in sorted(groups):
        members = groups[key]
        ordered.extend(members[i] for i in rng.permutation(len(members)))
    assigned = np.zeros(len(names))
    out: dict[int, str] = {}
    for count, image_id in enumerate(ordered, start=1):
        deficit = shares * count - assigned
        choice = int(np.argmax(deficit))  # ties go to the earlier split (train first)
        assigned[choice] += 1
        out[image_id] = names[choice]
    return out
