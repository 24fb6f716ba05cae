"""Tests for ml_worker.active_learning: scores, strategies (planted toy cases), analyze_tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_worker.active_learning import (
    STRATEGIES,
    TileAnalysis,
    analyze_tile,
    boundary_band,
    cost_weighted,
    k_center_greedy,
    rank,
    uncertainty_scores,
)
from ml_worker.models import create_model
from ml_worker.models.base import KaryoModel

torch.set_num_threads(1)

SIZE = 32
RNG = np.random.default_rng(0)


def _disk_instances(size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    inst[(yy - 9) ** 2 + (xx - 9) ** 2 <= 25] = 1
    inst[(yy - 20) ** 2 + (xx - 21) ** 2 <= 30] = 2
    return inst


def _confident_probs(inst: np.ndarray, lo: float = 0.02) -> np.ndarray:
    fg = np.where(inst > 0, 1.0 - lo, lo).astype(np.float32)
    return np.stack([1.0 - fg, fg])


def _scores_for(probs_list, inst_list):
    return [uncertainty_scores(p, i) for p, i in zip(probs_list, inst_list)]


# ----------------------------------------------------------------------------- scores


def test_scores_range_and_sigmoid_kind():
    inst = _disk_instances()
    s = uncertainty_scores(_confident_probs(inst), inst)
    assert set(s) == {"entropy", "margin", "boundary", "expected_fixes"}
    assert all(0.0 <= v <= 1.0 for k, v in s.items() if k != "expected_fixes")
    assert 0.0 <= s["expected_fixes"] < 0.3 * len(np.unique(inst))  # a count of nuclei, low when confident
    flat = uncertainty_scores(np.full((2, 8, 8), 0.5, np.float32))
    assert flat["entropy"] == pytest.approx(1.0, abs=1e-5) and flat["margin"] == pytest.approx(1.0)
    # multi-head (sigmoid) output: only the nucleus channel (0) counts
    mh = np.stack([np.full((8, 8), 0.5), np.zeros((8, 8)), np.ones((8, 8))]).astype(np.float32)
    assert uncertainty_scores(mh, kind="sigmoid")["entropy"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="kind"):
        uncertainty_scores(mh, kind="relu")


def test_boundary_band_covers_contours_only():
    inst = _disk_instances()
    band = boundary_band(inst, band=2)
    assert band[9, 4] and band[9, 14]  # on the disk edge (radius 5 around (9, 9))
    assert not band[9, 9] and not band[0, 31]  # centre, far background


# ----------------------------------------------------------------------------- strategies


def _planted_uncertain(n: int = 6, planted: int = 3):
    inst = _disk_instances()
    probs, insts = [], []
    for i in range(n):
        p = _confident_probs(inst)
        if i == planted:
            fg = np.clip(0.5 + RNG.normal(0, 0.03, inst.shape), 0, 1).astype(np.float32)
            p = np.stack([1 - fg, fg])
        probs.append(p)
        insts.append(inst)
    return _scores_for(probs, insts)


@pytest.mark.parametrize("name", ["entropy", "margin"])
def test_score_strategies_rank_planted_uncertain_tile_first(name):
    scores = _planted_uncertain(planted=3)
    order = rank(name, scores)
    assert order[0] == 3
    assert sorted(order) == list(range(6))


def test_boundary_ranks_border_uncertainty_above_background_uncertainty():
    inst = _disk_instances()
    band = boundary_band(inst, 2)
    probs = []
    for i in range(5):
        p = _confident_probs(inst)
        if i == 2:  # planted: unsure exactly on the nucleus borders
            p[:, band] = 0.5
        else:  # decoys: a wide unsure background region far from nuclei (more pixels)
            p[:, 27:, :] = 0.5
            p[:, :, 29:] = 0.5
        probs.append(p)
    scores = _scores_for(probs, [inst] * 5)
    assert rank("boundary", scores)[0] == 2
    assert rank("entropy", scores)[0] != 2  # mean entropy prefers the decoys
    # no predicted nucleus: boundary falls back to entropy
    empty = uncertainty_scores(probs[0], np.zeros_like(inst))
    assert empty["boundary"] == empty["entropy"]


def test_random_is_seeded_and_a_permutation():
    scores = [{"entropy": 0.1}] * 20
    a = rank("random", scores, seed=7)
    assert a == rank("random", scores, seed=7)
    assert a != rank("random", scores, seed=8)
    assert sorted(a) == list(range(20))
    assert rank("random", [], seed=0) == []


def test_unknown_strategy_and_missing_scores_errors():
    with pytest.raises(ValueError) as e:
        rank("bald", [{"entropy": 0.5}])
    msg = str(e.value)
    for name in STRATEGIES:
        assert name in msg
    with pytest.raises(ValueError, match=r"mc_samples>0"):
        rank("mc_dropout", [{"entropy": 0.5}, {"entropy": 0.2}])
    with pytest.raises(ValueError, match=r"tta=True"):
        rank("tta", [{"entropy": 0.5}])
    with pytest.raises(ValueError, match="embeddings"):
        rank("hybrid", [{"entropy": 0.5}])


def test_every_strategy_declares_name_and_required_scores():
    for name, s in STRATEGIES.items():
        assert s.name == name
        assert isinstance(s.required_scores, tuple)
        keys = ("entropy", "margin", "boundary", "mc_dropout", "tta", "expected_fixes", "instance_flips")
        scores = [{k: 0.1 * i for k in keys} for i in range(4)]
        emb = np.eye(4)
        assert sorted(rank(name, scores, embeddings=emb, k=2)) == [0, 1, 2, 3]


def _hybrid_case():
    # 4 near-duplicate very uncertain tiles, 1 distinct uncertain tile, 5 confident ones
    base = np.zeros(8)
    base[0] = 1.0
    emb, ent = [], []
    for i in range(4):
        emb.append(base + RNG.normal(0, 0.01, 8))
        ent.append(0.9 - 0.01 * i)
    distinct = np.zeros(8)
    distinct[:2] = -1.0, 1.0  # farther from the cluster than the (orthogonal) confident tiles
    emb.append(distinct)
    ent.append(0.8)
    for i in range(5):
        e = np.zeros(8)
        e[2 + i] = 1.0
        emb.append(e)
        ent.append(0.1)
    return [{"entropy": v} for v in ent], np.array(emb)


def test_hybrid_batch_is_diverse():
    scores, emb = _hybrid_case()
    assert 4 not in rank("entropy", scores)[:2]  # pure uncertainty takes two duplicates
    order = rank("hybrid", scores, embeddings=emb, k=2)
    assert order[0] == 0 and 4 in order[:2]
    assert sorted(order) == list(range(10))
    # the rest follow by uncertainty
    assert order[2:5] == [1, 2, 3]


def test_hybrid_treats_labelled_tiles_as_centres():
    scores, emb = _hybrid_case()
    # the duplicate cluster is already labelled: the distinct tile comes first
    order = rank("hybrid", scores, embeddings=emb, k=2, labelled_embeddings=emb[:1] + 0.001)
    assert order[0] == 4
    with pytest.raises(ValueError, match="labelled embeddings"):
        rank("hybrid", scores, embeddings=emb, k=1, labelled_embeddings=np.zeros((2, 3)))


def test_hybrid_cost_weighting_demotes_crowded_tile():
    scores = [{"entropy": v} for v in (0.95, 0.7, 0.65, 0.6, 0.2, 0.1)]
    emb = np.eye(6)
    counts = np.array([200, 10, 12, 8, 10, 9])
    assert rank("hybrid", scores, embeddings=emb, k=2)[0] == 0
    weighted = rank("hybrid", scores, embeddings=emb, k=2, costs=counts)
    assert 0 not in weighted[:2]
    assert 0 in rank("hybrid", scores, embeddings=emb, k=2, costs=counts, cost_alpha=0.0)[:2]
    np.testing.assert_allclose(cost_weighted(np.ones(3), np.zeros(3)), np.ones(3))


def test_facility_location_prefers_representative_over_outlier():
    from ml_worker.active_learning.strategies import facility_location_greedy

    cluster = np.array([[1.0, 0.1 * i, 0.0] for i in range(6)])
    outlier = np.array([[0.0, 0.0, 1.0]])
    emb = np.vstack([cluster, outlier])
    # k-center reaches for the outlier, facility location for the cluster
    assert k_center_greedy(emb, 2)[1] == 6
    assert facility_location_greedy(emb, [6, 0, 3], 1) == [3]
    # once the cluster is labelled, the outlier is what is left to cover
    assert facility_location_greedy(emb, [6, 0, 3], 1, centers=cluster) == [6]


def test_k_center_greedy_farthest_first():
    pts = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [5.0, 5.0]])
    assert k_center_greedy(pts, 3, normalize=False) == [0, 2, 3]
    assert k_center_greedy(pts, 9, normalize=False)[:1] == [0]
    assert k_center_greedy(pts, 0) == []


# ----------------------------------------------------------------------------- analyze_tile


class PlantedNet(KaryoModel):
    """Toy semantic model whose only uncertainty is planted on flat (constant) tiles.

    z = channel mean of the z-scored input; on the two-tone decoy tiles |z| >= 0.5 so
    g = exp(-50 z²) ≈ 0, on a constant tile z = 0 and g = 1.

    * ``mode="mc"``: fg logit = 30 + 40 z + (f₁ - f₂) with bottleneck features f₁ = f₂ =
      40 g: deterministic passes are confident everywhere (the planted tile even more so
      than the decoys), but dropout on the bottleneck unbalances f₁ - f₂ on the planted tile.
    * ``mode="tta"``: fg logit = 20 z + 40 g · ramp(x): a position-dependent (not flip
      equivariant) output on the planted tile only.
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.feat = _Features()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.embed_dim = 2

    def bottleneck(self, x):
        return self.feat(x)

    def forward(self, x):
        z = x.mean(1, keepdim=True)
        f = self.feat(x)
        if self.mode == "mc":
            fg = 30 + 40 * z + (f[:, :1] - f[:, 1:2])
        else:
            ramp = torch.linspace(-1, 1, x.shape[-1]).view(1, 1, 1, -1)
            fg = 20 * z + f[:, :1] * ramp
        return torch.cat([torch.zeros_like(fg), fg + 0 * self.dummy], 1)


class _Features(torch.nn.Module):
    def forward(self, x):
        g = torch.exp(-50 * x.mean(1, keepdim=True) ** 2)
        return torch.cat([40 * g, 40 * g], 1)


def _toy_tiles(n: int = 4, planted: int = 2):
    tiles = []
    for i in range(n):
        if i == planted:
            tiles.append(np.full((SIZE, SIZE, 3), 128, np.uint8))
        else:
            blocks = RNG.random((4, 4)) < 0.5
            blocks[0, 0], blocks[0, 1] = True, False
            img = np.kron(blocks, np.ones((8, 8))).astype(np.uint8) * 255
            tiles.append(np.repeat(img[..., None], 3, axis=2))
    return tiles


def test_mc_dropout_finds_planted_unstable_tile_and_restores_model():
    model = PlantedNet("mc")
    tiles = _toy_tiles(planted=2)
    res = [analyze_tile(model, t, tile_size=SIZE, device="cpu", mc_samples=6, mc_dropout_p=0.5) for t in tiles]
    scores = [r.scores for r in res]
    assert rank("mc_dropout", scores)[0] == 2
    assert scores[2]["mc_dropout"] > 0.01 and max(s["mc_dropout"] for i, s in enumerate(scores) if i != 2) < 1e-4
    assert scores[2]["mc_mutual_info"] > 0
    assert rank("entropy", scores)[0] != 2  # deterministic passes cannot see it
    assert not model.feat._forward_hooks and not model.feat._forward_pre_hooks
    # reproducible masks (seeded generator)
    again = analyze_tile(model, tiles[2], tile_size=SIZE, device="cpu", mc_samples=6, mc_dropout_p=0.5)
    assert again.scores["mc_dropout"] == pytest.approx(scores[2]["mc_dropout"])


def test_tta_finds_planted_non_equivariant_tile():
    model = PlantedNet("tta")
    tiles = _toy_tiles(planted=1)
    scores = [analyze_tile(model, t, tile_size=SIZE, device="cpu", tta=True).scores for t in tiles]
    assert rank("tta", scores)[0] == 1
    assert scores[1]["tta"] > 0.05 and max(s["tta"] for i, s in enumerate(scores) if i != 1) < 1e-4


@pytest.mark.parametrize("arch,kind", [("dssnet", "softmax"), ("multihead_unet", "sigmoid")])
def test_analyze_tile_real_model(arch, kind):
    from ml_worker.data import preprocess
    from ml_worker.synth import generate

    torch.manual_seed(0)
    kw = dict(width=4, feature_channels=8, expand_channels=8, num_blocks=1, decoder_channels=8, sr_channels=4)
    model = create_model(arch, **(kw if arch == "dssnet" else dict(width=4, depth=2)))
    img, _ = generate("he", 48, seed=1)
    a = analyze_tile(model, img, tile_size=64, device="cpu")
    assert isinstance(a, TileAnalysis) and a.kind == kind
    assert a.instances.shape == (48, 48) and a.instances.dtype == np.int32
    assert a.probs.shape == (model.out_channels, 48, 48) and a.probs.dtype == np.float32
    assert a.embedding.shape == (model.embed_dim,) and a.embedding.dtype == np.float32
    assert a.nucleus_count == len(np.unique(a.instances)) - 1
    assert set(a.scores) == {"entropy", "margin", "boundary", "expected_fixes"}
    # a tile inside one inference tile: the embedding is model.embed of the whole tile
    model.eval()
    ref = model.embed(torch.from_numpy(preprocess(img))[None])[0].numpy()
    np.testing.assert_allclose(a.embedding, ref, rtol=1e-4, atol=1e-6)
    # larger than the inference tile: mean over the tiles, still (D,)
    big = analyze_tile(model, np.tile(img, (2, 2, 1)), tile_size=48, overlap=16, device="cpu", tta=True)
    assert big.embedding.shape == (model.embed_dim,) and "tta" in big.scores


def test_analyze_tiles_batched_equals_single():
    from ml_worker.active_learning import analyze_tiles
    from ml_worker.synth import generate

    torch.manual_seed(0)
    model = create_model("unet", width=4, depth=2)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.randn(4, 3, 32, 32) * 2)
    model.eval()
    tiles = [generate("he", 30, seed=i)[0] for i in range(3)] + [generate("he", (40, 20), seed=9)[0]]
    tiles.append(generate("he", 70, seed=5)[0])  # larger than the tile: per-tile path
    single = [analyze_tile(model, t, tile_size=32, overlap=8, device="cpu", tta=True) for t in tiles]
    batched = analyze_tiles(model, tiles, tile_size=32, overlap=8, batch_size=2, device="cpu", tta=True)
    for a, b in zip(single, batched):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-4, atol=1e-6)
        assert (a.instances == b.instances).all() and a.nucleus_count == b.nucleus_count
        assert a.scores == pytest.approx(b.scores, abs=1e-5)
    mc = analyze_tiles(model, tiles[:3], tile_size=32, device="cpu", mc_samples=2)
    assert all("mc_dropout" in a.scores for a in mc)
