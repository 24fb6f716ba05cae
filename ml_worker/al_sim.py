"""Active-learning simulation benchmark: ``python -m ml_worker.al_sim``.

An oracle annotator (the ground-truth masks) labels tiles chosen by each strategy; the
benchmark measures how fast segmentation quality grows with the number of labelled tiles
and how much the annotator had to correct.

Protocol (per seed, identical for every strategy):

1. A fixed set of **held-out images** (image-level split, ``--held-out`` images chosen with
   ``--split-seed``, the same for every seed and strategy) is only used for evaluation.
   The other images are cut into disjoint ``--tile`` x ``--tile`` **pool tiles** (cut by
   image, so no held-out pixel ever reaches the pool).
2. A random **seed set** of ``--init`` pool tiles is labelled and a model is trained from
   scratch on it (``--init-epochs`` epochs) — shared by all strategies of that seed.
3. For ``--rounds`` rounds: the current model analyses the unlabelled pool
   (``ml_worker.active_learning.analyze_tile``: one prediction, scores, embedding), the
   strategy ranks it (``rank``, with the labelled tiles' embeddings as k-center centres),
   the oracle labels the next ``--batch`` tiles, the model **warm-starts** from the
   previous round's weights and trains ``--epochs-per-round`` more epochs on all labelled
   tiles, and is evaluated (Dice, AJI, ... on the held-out images).
   Warm start uses ``ml_worker.training``'s resume: round r continues the previous round's
   ``last.pt`` (weights and optimizer state) with one more epoch budget.
4. The **correction effort** of each round is measured on the batch just labelled, with the
   predictions the model made on those tiles *before* they were labelled
   (``active_learning.effort.correction_effort``: share of true nuclei added or redrawn at
   IoU < 0.7, share of predicted nuclei deleted).
5. A **full-data** model trained from scratch on every pool tile with the same training
   budget (``init_epochs + rounds * epochs_per_round`` epochs of ``--epoch-patches``
   patches) gives the reference Dice; the benchmark reports the labelled tiles each
   strategy needs to reach 95 % of it (on the mean curve over seeds; "not reached" when it
   does not), the area under the learning curves (normalised by the x range: the mean
   Dice / AJI over the budget), and everything per seed in JSON.

6. **Cold start** (strategies with ``cold_start``: ``typical``, ``adaptive``): the seed set
   itself is chosen by typicality (``active_learning.coldstart``) on embeddings of an
   *untrained* model (seeded like the run) — or, with the ``+ssl`` suffix, of the encoder
   pretrained self-supervised on the pool tiles (``ml_worker.ssl``), whose weights then also
   start every training of that run. ``random+ssl`` isolates the effect of the pretrained
   weights. Every other strategy starts from the shared random seed set.
7. ``--budget quick`` (CI-sized) / ``--budget standard`` set the sizes; ``--data
   synth:pap:N:SIZE`` generates a Pap-smear-like set (``ml_worker.synth``) instead of a folder.

Outputs: a table on stdout, ``OUT/al_sim.json`` and ``OUT/al_sim.png`` (learning curves with
±std bands, effort per round). Every number is measured in the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_worker.active_learning import (
    STRATEGIES,
    FixesStrategy,
    aggregate_effort,
    analyze_tiles,
    correction_effort,
    embed_tile,
    get_strategy,
    rank,
)
from ml_worker.active_learning.coldstart import typical_diverse
from ml_worker.al_sim_report import TARGET_FRACTION, format_report, plot, summarize
from ml_worker.data import DataError, Sample, load_folder, split_by_image

__all__ = ["SimConfig", "QUICK", "TARGET_FRACTION", "cut_tiles", "run_simulation", "summarize", "format_report", "plot", "main"]



# ============================================================================ config
@dataclass
class SimConfig:
    """Simulation settings (stored in the JSON).

    Attributes:
        data: dataset folder (common layout).
        strategies: names in ``ml_worker.active_learning.STRATEGIES``.
        rounds: acquisition rounds after the seed set.
        batch: tiles labelled per round.
        init: seed-set size (default: ``batch``).
        seeds: repetitions (seed set, model init, patch sampling and ``random`` differ).
        tile: pool tile side (px); images are cut into disjoint tiles of this size.
        held_out: number of held-out images (int >= 1) or a fraction of the images (< 1).
        split_seed: seed of the held-out split (fixed across seeds).
        arch, width, model_kwargs: model (``width`` goes into the model kwargs; ``unet``
            also gets ``depth``).
        depth: U-Net depth.
        patch: training patch side (random crops of the labelled tiles).
        train_batch: patches per optimizer step.
        epoch_patches: patches per training epoch (the unit of the training budget).
        init_epochs: epochs from scratch on the seed set.
        epochs_per_round: epochs added per round (warm start).
        lr, optimizer, loss: optimisation (``ml_worker.training``; SGD with Nesterov
            momentum was the most stable on CPM-15 for these short schedules).
        augment: augmentation preset.
        input_norm: ``TrainConfig.input_norm``. ``image`` (per-image z-score) here, not the
            training default ``dataset``: on CPM-15 (20x and 40x images, different stains) the
            channel statistics of 4 seed tiles do not carry to the held-out images — measured
            with 4 random 128-px tiles, 3 epochs of 128 patches, held out image03 + image12:
            Dice 0.433 / AJI 0.324 with ``dataset`` vs 0.833 / 0.574 with ``image``.
        eval_tile: inference tile on the held-out images.
        pool_limit: analyse at most this many (random) unlabelled tiles per round.
        mc_samples: MC-dropout passes (only when ``mc_dropout`` is simulated).
        cost_alpha: > 0 passes the predicted nucleus counts as costs to ``hybrid*``.
        bn_recalibration: recompute BatchNorm statistics on the labelled tiles after each
            training (:func:`recalibrate_batchnorm`) before predicting / evaluating.
        device: ``auto`` / ``cpu`` / ``cuda``.
        threads: torch CPU threads; 1 by default because on shared CPUs more OpenMP
            threads are several times *slower* (measured 0.13 s vs 0.55 s per step); None
            = torch's default.
    """

    data: str = ""
    strategies: list[str] = field(default_factory=lambda: ["hybrid", "entropy", "random"])
    rounds: int = 6
    batch: int = 8
    init: int | None = None
    seeds: int = 3
    tile: int = 64
    held_out: float = 4
    split_seed: int = 0
    arch: str = "unet"
    width: int = 8
    depth: int = 3
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    patch: int = 64
    train_batch: int = 8
    epoch_patches: int = 128
    init_epochs: int = 3
    epochs_per_round: int = 1
    lr: float = 1e-2
    optimizer: str = "sgd"
    loss: str | None = None
    augment: str = "light"
    input_norm: str = "image"
    eval_tile: int = 256
    pool_limit: int | None = None
    mc_samples: int = 4
    cost_alpha: float = 0.0
    bn_recalibration: bool = True
    device: str = "auto"
    threads: int | None = 1
    quick: bool = False
    budget: str | None = None
    ssl_steps: int = 150

    def validate(self) -> None:
        if not self.strategies:
            raise ValueError("no strategy given")
        for s in self.strategies:
            get_strategy(base_strategy(s))  # ValueError listing the known names
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError("a strategy is listed twice")
        for name in ("rounds", "batch", "seeds", "tile", "patch", "train_batch", "epoch_patches",
                     "init_epochs", "epochs_per_round", "eval_tile"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.init is not None and self.init < 1:
            raise ValueError("init must be >= 1")
        if self.held_out <= 0:
            raise ValueError("held_out must be > 0 (a count, or a fraction < 1)")

    @property
    def n_init(self) -> int:
        return int(self.init or self.batch)

    @property
    def total_epochs(self) -> int:
        return int(self.init_epochs + self.rounds * self.epochs_per_round)

    def model_config(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"width": int(self.width)}
        if self.arch in ("unet", "multihead_unet"):
            kw["depth"] = int(self.depth)
        if self.arch == "dssnet":  # a narrow DSSNet: every stage scaled with width
            w = int(self.width)
            kw.update(feature_channels=2 * w, expand_channels=2 * w, num_blocks=2, decoder_channels=2 * w,
                      sr_channels=w, sr_blocks=1)
        kw.update(self.model_kwargs)
        return kw


#: overrides of ``--quick`` (CPU, < 15 min for three strategies)
QUICK: dict[str, Any] = dict(rounds=6, batch=4, init=4, seeds=2, tile=64, patch=64, epoch_patches=128,
                             init_epochs=3, epochs_per_round=1, eval_tile=256, held_out=3, pool_limit=300)

#: ``--budget`` presets: ``quick`` is CI-sized (minutes on a free CPU; too little training for
#: the curves to mean much), ``standard`` the study's figures (5 seeds, 128-px pool tiles, 4 + 2 x 8
#: labelled tiles; ~50 min for four strategies on a 2-core CPU shared with ~8 other processes,
#: where one round costs ~40 s). Fewer than
#: ~128 patches per epoch leaves the models so undertrained that the curves are flat: the
#: full-data model is then no better than the 4-tile one and no strategy can differ.
BUDGETS: dict[str, dict[str, Any]] = {
    "quick": dict(rounds=3, batch=2, init=2, seeds=2, tile=128, patch=64, epoch_patches=32, init_epochs=2,
                  epochs_per_round=1, eval_tile=256, held_out=2, pool_limit=60, ssl_steps=30),
    "standard": dict(rounds=2, batch=8, init=4, seeds=5, tile=128, patch=64, epoch_patches=128, init_epochs=3,
                     epochs_per_round=1, eval_tile=256, held_out=2, pool_limit=48, ssl_steps=30),
}

SSL_SUFFIX = "+ssl"


def base_strategy(name: str) -> str:
    """The engine strategy of a simulated one (``adaptive+ssl`` -> ``adaptive``)."""
    return name[: -len(SSL_SUFFIX)] if name.endswith(SSL_SUFFIX) else name


# ============================================================================ data
def cut_tiles(samples: Sequence[Sample], tile: int) -> list[Sample]:
    """Disjoint ``tile`` x ``tile`` tiles of every image (row-major; the remainder along
    the right / bottom edge is dropped). An image smaller than a tile along a side gives one
    tile of its own size along that side. Names: ``IMAGE@y,x``."""
    out: list[Sample] = []
    for s in samples:
        H, W = s.shape
        th, tw = min(tile, H), min(tile, W)
        for y in range(0, H - th + 1, th):
            for x in range(0, W - tw + 1, tw):
                out.append(Sample(f"{s.name}@{y},{x}", np.ascontiguousarray(s.image[y : y + th, x : x + tw]),
                                  np.ascontiguousarray(s.instances[y : y + th, x : x + tw])))
    return out


def load_dataset(spec: str) -> list[Sample]:
    """A dataset folder, or ``synth:KIND[:N[:SIZE]]`` (e.g. ``synth:pap:12:384``): N generated
    images of SIZE px (``ml_worker.synth``, seeds 0..N-1), written to a temporary folder."""
    if not str(spec).startswith("synth:"):
        return load_folder(spec)
    from ml_worker.synth import KINDS, write_dataset

    parts = str(spec).split(":")[1:]
    kind = parts[0] if parts else "pap"
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; known: {', '.join(KINDS)}")
    try:
        n = int(parts[1]) if len(parts) > 1 else 12
        size = int(parts[2]) if len(parts) > 2 else 384
    except ValueError:
        raise ValueError(f"bad synthetic data spec {spec!r}: expected synth:KIND:N:SIZE") from None
    with tempfile.TemporaryDirectory(prefix="al_sim_synth_") as d:
        write_dataset(d, n, kind, size, seed=0)
        return load_folder(d)


def _split(samples: list[Sample], cfg: SimConfig) -> tuple[list[Sample], list[Sample]]:
    n = len(samples)
    if n < 2:
        raise DataError("the simulation needs at least 2 images (held-out images + pool)")
    n_held = int(round(cfg.held_out * n)) if cfg.held_out < 1 else int(cfg.held_out)
    n_held = min(max(1, n_held), n - 1)
    pool, held = split_by_image(samples, n_held / n, seed=cfg.split_seed)
    if len(held) != n_held:  # split_by_image rounds the fraction; make it exact
        perm = np.random.default_rng(cfg.split_seed).permutation(n)
        hid = set(perm[:n_held].tolist())
        pool = [s for i, s in enumerate(samples) if i not in hid]
        held = [s for i, s in enumerate(samples) if i in hid]
    return pool, held


# ============================================================================ training
class _Trainer:
    """Train / warm-start / evaluate through ``ml_worker.training`` (imported lazily)."""

    def __init__(self, cfg: SimConfig, work: Path, held_out: list[Sample]) -> None:
        from ml_worker import training

        self.t = training
        self.cfg = cfg
        self.work = work
        self.held_out = held_out
        self.train_seconds = 0.0
        self.eval_seconds = 0.0

    def train(self, samples: list[Sample], out_dir: Path, epochs: int, seed: int,
              resume: str | None = None, init_weights: str | None = None) -> str:
        c = self.cfg
        tc = self.t.TrainConfig(
            arch=c.arch, model_kwargs=c.model_config(), epochs=int(epochs), batch_size=c.train_batch,
            lr=c.lr, optimizer=c.optimizer, loss=c.loss, tile_size=c.patch, steps_per_epoch=c.epoch_patches, seed=int(seed),
            augment=c.augment, early_stopping_patience=None, device=c.device, val_fraction=0.0,
            resume=resume, out_dir=str(out_dir), init_weights=None if resume else init_weights,
            input_norm=c.input_norm,
        )
        t0 = time.perf_counter()
        res = self.t.train(tc, samples, [])
        self.train_seconds += time.perf_counter() - t0
        if res.status != "completed" or not res.last_path:
            raise RuntimeError(f"training ended with status {res.status!r}")
        return res.last_path

    def load(self, ckpt: str, samples: Sequence[Sample] | None = None, seed: int = 0) -> tuple[Any, Any]:
        """The model of ``ckpt`` for inference, BatchNorm statistics recalibrated on
        ``samples`` (the labelled tiles) when given and ``bn_recalibration`` is on."""
        model, norm, _ = self.t.load_for_inference(ckpt)
        if samples and self.cfg.bn_recalibration:
            from ml_worker.stabilize import recalibrate_batchnorm

            t0 = time.perf_counter()
            recalibrate_batchnorm(model, samples, self.cfg.tile, normalizer=norm, seed=seed,
                                  device=self._device())
            self.train_seconds += time.perf_counter() - t0
        return model, norm

    def evaluate(self, model: Any, norm: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        mean, _ = self.t.evaluate_samples(model, self.held_out, tile_size=self.cfg.eval_tile, batch_size=8,
                                          device=self._device(), normalizer=norm)
        self.eval_seconds += time.perf_counter() - t0
        return mean

    def _device(self) -> str | None:
        return None if self.cfg.device in ("", "auto") else self.cfg.device


# ============================================================================ simulation
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _count(inst: np.ndarray) -> int:
    return int(np.count_nonzero(np.unique(inst)))


def _metrics_subset(m: dict[str, float]) -> dict[str, float]:
    return {k: float(m[k]) for k in ("dice", "aji", "pq", "dsb_map", "object_f1") if k in m}


def _run_strategy(
    name: str, seed: int, cfg: SimConfig, pool: list[Sample], init_idx: list[int], round0_ckpt: str,
    round0_metrics: dict[str, float], trainer: _Trainer, work: Path,
) -> dict[str, Any]:
    strat = get_strategy(base_strategy(name))
    need = set(strat.required_scores)
    mc = cfg.mc_samples if "mc_dropout" in need else 0
    tta = "tta" in need
    analyse_pool = bool(need) or strat.needs_embeddings
    device = trainer._device()
    rng = np.random.default_rng((seed, 7))
    labelled = list(init_idx)
    curve = {"labelled": [len(labelled)], "nuclei_labelled": [sum(_count(pool[i].instances) for i in labelled)],
             "metrics": [round0_metrics]}
    efforts: list[dict[str, float]] = []
    selected: list[list[str]] = []
    ckpt = round0_ckpt
    out_dir = work / f"seed{seed}" / name
    t_analysis = 0.0
    model, norm = trainer.load(ckpt, [pool[i] for i in labelled], seed)
    init_names = [pool[i].name for i in labelled]
    for r in range(1, cfg.rounds + 1):
        unl = [i for i in range(len(pool)) if i not in set(labelled)]
        if not unl:
            break
        cand = unl
        if cfg.pool_limit and len(unl) > cfg.pool_limit:
            cand = sorted(rng.choice(unl, cfg.pool_limit, replace=False).tolist())
        k = min(cfg.batch, len(cand))
        t0 = time.perf_counter()
        preds: dict[int, np.ndarray] = {}
        if analyse_pool:
            analyses = analyze_tiles(model, [pool[i].image for i in cand], normalizer=norm, tile_size=cfg.tile,
                                     overlap=0, batch_size=32, device=device, mc_samples=mc, tta=tta,
                                     seed=seed * 1000 + r)
            for i, a in zip(cand, analyses):
                a.probs = None
                preds[i] = a.instances
            emb = np.stack([a.embedding for a in analyses])
            lab_emb = None
            if strat.needs_embeddings and labelled:
                lab_emb = np.stack([embed_tile(model, pool[i].image, normalizer=norm, tile_size=cfg.tile,
                                               device=device) for i in labelled])
            costs = np.array([a.nucleus_count for a in analyses], float) if cfg.cost_alpha > 0 else None
            opts = {"cost_alpha": cfg.cost_alpha} if costs is not None and strat.needs_embeddings else {}
            if isinstance(strat, FixesStrategy):  # the effort model always needs the nuclei to check
                costs = np.array([a.nucleus_count for a in analyses], float)
            order = rank(strat.name, [a.scores for a in analyses], embeddings=emb, costs=costs, k=k,
                         seed=seed * 1000 + r, labelled_embeddings=lab_emb, **opts)
        else:
            order = rank(strat.name, [{} for _ in cand], k=k, seed=seed * 1000 + r)
        batch = [cand[j] for j in order[:k]]
        todo = [i for i in batch if i not in preds]  # predictions shown to the annotator (random)
        for i, a in zip(todo, analyze_tiles(model, [pool[i].image for i in todo], normalizer=norm,
                                            tile_size=cfg.tile, overlap=0, batch_size=32, device=device)):
            preds[i] = a.instances
        t_analysis += time.perf_counter() - t0
        eff = aggregate_effort(correction_effort(preds[i], pool[i].instances) for i in batch)
        efforts.append(eff)
        selected.append([pool[i].name for i in batch])
        labelled += batch
        ckpt = trainer.train([pool[i] for i in labelled], out_dir, cfg.init_epochs + r * cfg.epochs_per_round,
                             seed, resume=ckpt)
        model, norm = trainer.load(ckpt, [pool[i] for i in labelled], seed)
        m = _metrics_subset(trainer.evaluate(model, norm))
        curve["labelled"].append(len(labelled))
        curve["nuclei_labelled"].append(curve["nuclei_labelled"][-1] + int(eff["n_true"]))
        curve["metrics"].append(m)
        _log(f"  [{name} seed {seed}] round {r}: {len(labelled)} tiles, dice {m['dice']:.3f} aji {m['aji']:.3f}, "
             f"effort added/redrawn {eff['added_or_redrawn_share']:.2f} deleted {eff['deleted_share']:.2f}")
    return {
        "seed": seed,
        "labelled": curve["labelled"],
        "nuclei_labelled": curve["nuclei_labelled"],
        "dice": [m["dice"] for m in curve["metrics"]],
        "aji": [m["aji"] for m in curve["metrics"]],
        "pq": [m.get("pq", float("nan")) for m in curve["metrics"]],
        "metrics": curve["metrics"],
        "effort": efforts,
        "selected": selected,
        "init": init_names,
        "analysis_seconds": t_analysis,
    }


def _pretrain_ssl(cfg: SimConfig, pool: list[Sample], path: Path, seed: int) -> tuple[str, dict[str, Any]]:
    from ml_worker.ssl import SSLConfig, pretrain

    info = pretrain([t.image for t in pool], path, SSLConfig(
        arch=cfg.arch, model_kwargs=cfg.model_config(), steps=int(cfg.ssl_steps), batch_size=16, crop=cfg.patch,
        seed=seed, threads=cfg.threads))
    return info["path"], info


def _cold_start_set(cfg: SimConfig, pool: list[Sample], seed: int, ssl_ckpt: str | None) -> list[int]:
    """The seed set a cold-start strategy picks before any model: typical tiles of distinct
    k-means clusters of the pool's embeddings — by the self-supervised encoder, or else by an
    untrained model seeded like the run."""
    import torch

    from ml_worker.data import Preprocessing
    from ml_worker.models import create_model

    if ssl_ckpt is not None:
        from ml_worker.ssl import ssl_embeddings

        emb = ssl_embeddings(ssl_ckpt, [t.image for t in pool], tile_size=cfg.tile)
    else:
        torch.manual_seed(seed)
        model = create_model(cfg.arch, **cfg.model_config()).eval()
        prep = Preprocessing.fit([t.image for t in pool])
        emb = np.stack([embed_tile(model, t.image, normalizer=prep, tile_size=cfg.tile, device="cpu") for t in pool])
    return sorted(typical_diverse(emb, cfg.n_init, seed=seed))


def run_simulation(cfg: SimConfig, work_dir: str | Path | None = None,
                   checkpoint_json: str | Path | None = None) -> dict[str, Any]:
    """Run the whole benchmark (see module docstring) and return the JSON-able results
    (raw per-seed curves plus :func:`summarize`)."""
    import torch

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t_start = time.perf_counter()
    samples = load_dataset(cfg.data)
    pool_images, held_out = _split(samples, cfg)
    pool = cut_tiles(pool_images, cfg.tile)
    if len(pool) < cfg.n_init + cfg.batch:
        raise DataError(f"only {len(pool)} pool tiles of {cfg.tile}px: need at least init + batch = "
                        f"{cfg.n_init + cfg.batch}")
    _log(f"al_sim: {len(samples)} images -> {len(held_out)} held out ({', '.join(s.name for s in held_out)}), "
         f"{len(pool)} pool tiles of {cfg.tile}px from {len(pool_images)} images; strategies "
         f"{', '.join(cfg.strategies)}; {cfg.seeds} seed(s), {cfg.rounds} rounds of {cfg.batch}")
    tmp = tempfile.TemporaryDirectory(prefix="al_sim_") if work_dir is None else None
    work = Path(tmp.name if tmp is not None else work_dir)  # type: ignore[arg-type]
    trainer = _Trainer(cfg, work, held_out)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in cfg.strategies}
    full: list[dict[str, float]] = []
    ssl_info: list[dict[str, Any]] = []
    timing: dict[str, float] = {s: 0.0 for s in cfg.strategies}
    try:
        for seed in range(cfg.seeds):
            rng = np.random.default_rng(seed)
            random_init = sorted(rng.choice(len(pool), cfg.n_init, replace=False).tolist())
            ssl_ckpt = None
            if any(n.endswith(SSL_SUFFIX) for n in cfg.strategies):
                ssl_ckpt, info = _pretrain_ssl(cfg, pool, work / f"seed{seed}" / "ssl.pt", seed)
                ssl_info.append(info)
                _log(f"seed {seed}: self-supervised encoder, {info['steps']} steps, loss {info['loss_first']:.3f} -> "
                     f"{info['loss_last']:.3f} ({info['seconds']:.0f}s)")
            round0: dict[tuple, tuple[str, dict[str, float]]] = {}
            for name in cfg.strategies:
                use_ssl = name.endswith(SSL_SUFFIX)
                init_w = ssl_ckpt if use_ssl else None
                if getattr(get_strategy(base_strategy(name)), "cold_start", False):
                    init_idx = _cold_start_set(cfg, pool, seed, ssl_ckpt if use_ssl else None)
                else:
                    init_idx = random_init
                key = (tuple(init_idx), use_ssl)
                if key not in round0:
                    t0 = time.perf_counter()
                    ckpt0 = trainer.train([pool[i] for i in init_idx], work / f"seed{seed}" / f"round0-{len(round0)}",
                                          cfg.init_epochs, seed, init_weights=init_w)
                    m0 = _metrics_subset(trainer.evaluate(*trainer.load(ckpt0, [pool[i] for i in init_idx], seed)))
                    round0[key] = (ckpt0, m0)
                    _log(f"seed {seed}: seed set of {len(init_idx)} tiles ({name}) -> dice {m0['dice']:.3f} "
                         f"aji {m0['aji']:.3f} ({time.perf_counter() - t0:.0f}s)")
                ckpt0, m0 = round0[key]
                t0 = time.perf_counter()
                runs[name].append(_run_strategy(name, seed, cfg, pool, init_idx, ckpt0, m0, trainer, work))
                timing[name] += time.perf_counter() - t0
            t0 = time.perf_counter()
            ckpt_full = trainer.train(pool, work / f"seed{seed}" / "full", cfg.total_epochs, seed)
            mf = _metrics_subset(trainer.evaluate(*trainer.load(ckpt_full, pool, seed)))
            full.append(mf)
            _log(f"seed {seed}: full data ({len(pool)} tiles, {cfg.total_epochs} epochs) -> dice {mf['dice']:.3f} "
                 f"aji {mf['aji']:.3f} ({time.perf_counter() - t0:.0f}s)")
            if checkpoint_json is not None:  # partial results survive an interrupted study
                partial = {"config": dataclasses.asdict(cfg), "full_data": full, "runs": runs, "seeds_done": seed + 1}
                Path(checkpoint_json).write_text(json.dumps(partial, default=_json_default))
    finally:
        if tmp is not None:
            tmp.cleanup()
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "dataset": {
            "images": len(samples), "held_out": [s.name for s in held_out],
            "pool_images": [s.name for s in pool_images], "pool_tiles": len(pool), "tile": cfg.tile,
            "pool_nuclei": int(sum(_count(t.instances) for t in pool)),
        },
        "full_data": full,
        "ssl": ssl_info,
        "runs": runs,
        "timing_s": {"total": time.perf_counter() - t_start, "train": trainer.train_seconds,
                     "evaluate": trainer.eval_seconds, "per_strategy": timing},
    }
    results["summary"] = summarize(results)
    return results


# ============================================================================ CLI
def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ml_worker.al_sim", description=__doc__.split("\n\n")[0])
    d = SimConfig()
    p.add_argument("--data", required=True, help="dataset folder (DIR/images, DIR/masks)")
    p.add_argument("--strategy", default="hybrid,entropy,random",
                   help=f"comma-separated strategies ({', '.join(sorted(STRATEGIES))})")
    p.add_argument("--rounds", type=int, help=f"acquisition rounds (default {d.rounds}; quick {QUICK['rounds']})")
    p.add_argument("--batch", type=int, help=f"tiles labelled per round (default {d.batch}; quick {QUICK['batch']})")
    p.add_argument("--init", type=int, help="seed-set size (default: batch)")
    p.add_argument("--seeds", type=int, help=f"repetitions (default {d.seeds}; quick {QUICK['seeds']})")
    p.add_argument("--tile", type=int, help=f"pool tile side (default {d.tile})")
    p.add_argument("--held-out", type=float, help=f"held-out images: count, or fraction < 1 (default {d.held_out:g})")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--arch", choices=["unet", "dssnet", "multihead_unet"], default=d.arch)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--patch", type=int, help=f"training patch side (default {d.patch}; quick {QUICK['patch']})")
    p.add_argument("--epoch-patches", type=int, help=f"patches per epoch (default {d.epoch_patches})")
    p.add_argument("--init-epochs", type=int, help=f"epochs on the seed set (default {d.init_epochs})")
    p.add_argument("--epochs-per-round", type=int, help=f"warm-start epochs per round (default {d.epochs_per_round})")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--pool-limit", type=int, help="analyse at most N random unlabelled tiles per round")
    p.add_argument("--mc-samples", type=int, default=d.mc_samples)
    p.add_argument("--cost-alpha", type=float, default=0.0, help="> 0: hybrid weights uncertainty by 1/(1+a*count/mean)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch CPU threads (default {d.threads}: on shared CPUs more threads are slower; 0 = torch default)")
    p.add_argument("--quick", action="store_true", help=f"CPU preset, < 15 min: {QUICK}")
    p.add_argument("--budget", choices=sorted(BUDGETS), help=f"size preset (explicit options override it): {BUDGETS}")
    p.add_argument("--ssl-steps", type=int, help="self-supervised pretraining steps for the '+ssl' strategies")
    p.add_argument("--out", default="al-sim", help="output folder (al_sim.json, al_sim.png)")
    p.add_argument("--work-dir", help="keep the checkpoints here (default: a temporary folder)")
    return p


def config_from_args(a: argparse.Namespace) -> SimConfig:
    base: dict[str, Any] = dict(QUICK, quick=True) if a.quick else {}
    if a.budget:
        base = dict(BUDGETS[a.budget], budget=a.budget)
    if a.ssl_steps is not None:
        base["ssl_steps"] = a.ssl_steps
    explicit = {
        "rounds": a.rounds, "batch": a.batch, "init": a.init, "seeds": a.seeds, "tile": a.tile,
        "held_out": a.held_out, "patch": a.patch, "epoch_patches": a.epoch_patches,
        "init_epochs": a.init_epochs, "epochs_per_round": a.epochs_per_round, "pool_limit": a.pool_limit,
    }
    base.update({k: v for k, v in explicit.items() if v is not None})
    return SimConfig(
        data=str(a.data), strategies=[s.strip() for s in a.strategy.split(",") if s.strip()],
        split_seed=a.split_seed, arch=a.arch, width=a.width, lr=a.lr, mc_samples=a.mc_samples,
        cost_alpha=a.cost_alpha, device=a.device, threads=a.threads or None, **base,
    )


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.out)
    try:
        cfg = config_from_args(a)
        cfg.validate()
        out.mkdir(parents=True, exist_ok=True)
        results = run_simulation(cfg, a.work_dir, checkpoint_json=out / "al_sim.partial.json")
    except (ValueError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (out / "al_sim.json").write_text(json.dumps(results, indent=1, default=_json_default))
    plot(results, out / "al_sim.png")
    print(format_report(results))
    print(f"\nwrote {out / 'al_sim.json'} and {out / 'al_sim.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
