"""The product's budget-aware ranking (``active_learning.warmup``) and the label-free features
of cold start (``ssl.random_encoder_embeddings``, ``ssl.pretrain``'s stop and progress), with
planted 64-px tiles and tiny models."""
from __future__ import annotations

import numpy as np
import pytest

from ml_worker import catalog
from ml_worker.active_learning import rank
from ml_worker.active_learning.warmup import budgeted_rank, cold_start_rank, uncertain_share, uses_warm_up


def planted_tiles(seed: int = 0, per_kind: int = 10) -> tuple[list[np.ndarray], list[int]]:
    """Three kinds of 64-px tile (small dark nuclei on pink, few big nuclei on pale blue,
    stripes), ``per_kind`` near-duplicates each (noise, small shifts), and three outliers unlike
    anything else (a dark fold, noise, a green checkerboard): (tiles, kind per tile, -1 = outlier),
    shuffled."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    a = np.full((64, 64, 3), (235, 190, 215), np.uint8)
    for cy, cx in rng.integers(6, 58, (14, 2)):
        a[(yy - cy) ** 2 + (xx - cx) ** 2 < 9] = (90, 40, 120)
    b = np.full((64, 64, 3), (200, 215, 240), np.uint8)
    for cy, cx in rng.integers(14, 50, (3, 2)):
        b[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = (40, 60, 140)
    c = np.full((64, 64, 3), (220, 120, 150), np.uint8)
    c[(xx + yy) % 12 < 4] = (160, 60, 100)
    tiles, kinds = [], []
    for kind, base in enumerate((a, b, c)):
        for _ in range(per_kind):
            t = base.astype(np.int16) + rng.integers(-6, 7, base.shape)
            t = np.roll(t, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
            tiles.append(np.clip(t, 0, 255).astype(np.uint8))
            kinds.append(kind)
    fold = np.full((64, 64, 3), 250, np.uint8)
    fold[8:56, 8:56] = 30
    noise = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    checker = np.zeros((64, 64, 3), np.uint8)
    checker[(xx // 8 + yy // 8) % 2 == 0] = (40, 220, 60)
    tiles += [fold, noise, checker]
    kinds += [-1, -1, -1]
    perm = rng.permutation(len(tiles))
    return [tiles[i] for i in perm], [kinds[i] for i in perm]


def test_the_cold_start_covers_every_kind_of_tile_before_any_outlier():
    from ml_worker.ssl import random_encoder_embeddings

    tiles, kinds = planted_tiles()
    emb = random_encoder_embeddings(tiles, seed=0, tile_size=64)
    ranked = cold_start_rank(emb, k=8, seed=0)
    top = [kinds[i] for i in ranked.order[:3]]
    assert sorted(top) == [0, 1, 2]  # one tile of each kind first, then the smaller clusters
    # A batch of three: one of each kind, and the outliers are the least typical of all.
    three = cold_start_rank(emb, k=3, seed=0)
    assert sorted(kinds[i] for i in three.order[:3]) == [0, 1, 2]
    assert [kinds[i] for i in three.order[-3:]] == [-1, -1, -1]
    assert sorted(ranked.order) == list(range(len(tiles))) and ranked.phase == "typical"
    # Deterministic for a seed: the same features and the same order again.
    again = random_encoder_embeddings(tiles, seed=0, tile_size=64)
    np.testing.assert_array_equal(emb, again)
    assert cold_start_rank(again, k=8, seed=0).order == ranked.order


def test_labelled_tiles_cover_their_kind_in_the_cold_start():
    from ml_worker.ssl import random_encoder_embeddings

    tiles, kinds = planted_tiles()
    emb = random_encoder_embeddings(tiles, seed=0, tile_size=64)
    labelled = [i for i, k in enumerate(kinds) if k == 0][:3]  # kind 0 is already labelled
    cand = [i for i in range(len(tiles)) if i not in labelled]
    ranked = cold_start_rank(emb[cand], k=3, labelled_embeddings=emb[labelled], seed=0)
    assert sorted(kinds[cand[i]] for i in ranked.order[:2]) == [1, 2]


def test_the_share_of_the_batch_the_strategy_picks_grows_with_the_labelled_tiles():
    assert uncertain_share(0) == 0.0 and uncertain_share(8) == 0.0
    assert uncertain_share(16) == 0.5
    assert uncertain_share(24) == 1.0 and uncertain_share(500) == 1.0
    assert catalog.WARM_UP["cold_until"] == 8 and catalog.WARM_UP["warm_from"] == 24
    assert not uses_warm_up("random") and not uses_warm_up("typical") and not uses_warm_up("adaptive")
    assert uses_warm_up("hybrid") and uses_warm_up("fixes")
    with pytest.raises(ValueError, match="unknown strategy"):
        uses_warm_up("bogus")


def _scored_pool(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 6))
    scores = [{"entropy": float(v), "expected_fixes": float(2 * v)} for v in rng.random(n)]
    return scores, emb, rng.normal(size=(5, 6))


@pytest.mark.parametrize("labelled, typical_in_batch", [(0, 8), (16, 4), (24, 0), (40, 0)])
def test_the_default_strategy_picks_typical_tiles_while_labels_are_few(labelled, typical_in_batch):
    scores, emb, lab = _scored_pool()
    ranked = budgeted_rank("hybrid", scores, embeddings=emb, labelled=labelled, k=8, labelled_embeddings=lab)
    assert sorted(ranked.order) == list(range(len(scores)))
    assert ranked.picked_by[:8].count("typical") == typical_in_batch
    assert set(ranked.picked_by[8:]) == {"hybrid"}  # the rest of the pool: the strategy's order
    if typical_in_batch == 0:  # switched: exactly the strategy's ranking
        assert ranked.order == rank("hybrid", scores, embeddings=emb, k=8, labelled_embeddings=lab)
        assert ranked.phase == "model"
    else:
        assert ranked.phase == ("typical" if typical_in_batch == 8 else "mixed")
        # the strategy's picks are its own first picks at the smaller batch
        n_unc = 8 - typical_in_batch
        assert ranked.order[:n_unc] == rank("hybrid", scores, embeddings=emb, k=n_unc, labelled_embeddings=lab)[:n_unc]


def test_random_and_the_cold_start_strategies_are_ranked_as_they_are():
    scores, emb, lab = _scored_pool()
    for name in ("random", "adaptive", "typical"):
        ranked = budgeted_rank(name, scores, embeddings=emb, labelled=0, k=8, labelled_embeddings=lab, seed=3)
        assert ranked.order == rank(name, scores, embeddings=emb, k=8, labelled_embeddings=lab, seed=3)
        assert set(ranked.picked_by) == {name}


def test_pretraining_reports_progress_and_a_stopped_one_writes_no_checkpoint(tmp_path):
    from ml_worker.ssl import SSLConfig, pretrain

    tiles, _ = planted_tiles(per_kind=2)
    cfg = SSLConfig(arch="unet", model_kwargs={"width": 4, "depth": 2}, steps=4, batch_size=4, crop=32, threads=1,
                    input_norm="image")
    seen: list[dict] = []
    done = pretrain(tiles, tmp_path / "ssl.pt", cfg, progress=seen.append)
    assert done["status"] == "done" and (tmp_path / "ssl.pt").exists()
    assert [e["step"] for e in seen] == [1, 2, 3, 4] and seen[-1]["progress"] == 1.0
    calls = []
    stopped = pretrain(tiles, tmp_path / "stopped.pt", cfg, should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert stopped["status"] == "cancelled" and stopped["path"] is None and stopped["steps"] == 2
    assert not list(tmp_path.glob("stopped*")) and not list(tmp_path.glob(".stopped*"))
    with pytest.raises(ValueError, match="input_norm"):
        pretrain(tiles, tmp_path / "x.pt", SSLConfig(input_norm="bogus"))


def test_the_catalog_checks_pretraining_options():
    assert catalog.validate_ssl_options({"steps": "30"}) == {**catalog.ssl_defaults(), "steps": 30}
    with pytest.raises(catalog.CatalogError, match="steps must be an integer from 1") as err:
        catalog.validate_ssl_options({"steps": 0})
    assert err.value.field == "steps"
    with pytest.raises(catalog.CatalogError, match="unknown pretraining option 'epochs'"):
        catalog.validate_ssl_options({"epochs": 3})
    assert [o["name"] for o in catalog.as_dict()["ssl_options"]] == ["steps", "batch_size", "crop", "lr", "max_tiles"]



def test_batched_embeddings_equal_the_tile_by_tile_ones():
    import torch

    from ml_worker.active_learning import embed_tile
    from ml_worker.data import Preprocessing
    from ml_worker.models import create_model
    from ml_worker.ssl import embed_batched

    tiles, _ = planted_tiles(per_kind=2)
    tiles += [np.full((40, 72, 3), 120, np.uint8)]  # another shape: its own batch, padded to the divisor
    torch.manual_seed(0)
    model = create_model("unet", width=4, depth=2).eval()
    prep = Preprocessing.fit(tiles)
    one_by_one = np.stack([embed_tile(model, t, normalizer=prep, tile_size=64, device="cpu") for t in tiles])
    np.testing.assert_allclose(embed_batched(model, tiles, normalizer=prep, tile_size=64, batch_size=4), one_by_one,
                               rtol=1e-4, atol=1e-5)
