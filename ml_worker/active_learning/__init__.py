"""Active learning: score candidate tiles, rank them, measure correction effort.

Platform flow (backend/ml calls these; docs/ml_worker.md, section "Active learning")::

    analyses = [analyze_tile(model, tile, normalizer=norm) for tile in candidates]
    order = rank("hybrid", [a.scores for a in analyses],
                 embeddings=np.stack([a.embedding for a in analyses]),
                 k=batch_size, labelled_embeddings=embeddings_of_labelled_tiles)
    batch = order[:batch_size]
    ...
    correction_effort(pred_inst_shown, corrected_inst)   # after the annotator saved

``rank``, the strategies and ``correction_effort`` are numpy-only; ``analyze_tile``
imports torch when called.
"""

from ml_worker.active_learning.analysis import (
    TTA_TRANSFORMS,
    TileAnalysis,
    analyze_tile,
    analyze_tiles,
    bottleneck_dropout,
    embed_tile,
    find_bottleneck_module,
    output_kind,
)
from ml_worker.active_learning.coldstart import kmeans, typical_diverse, typicality
from ml_worker.active_learning.effort import aggregate_effort, correction_effort
from ml_worker.active_learning.nuclei import (
    apply_temperature,
    expected_fixes_heatmap,
    fit_temperature,
    fix_rate,
    instance_disagreement,
    nucleus_scores,
)
from ml_worker.active_learning.scores import (
    CHEAP_SCORES,
    boundary_band,
    foreground_probability,
    pixel_entropy,
    pixel_margin,
    uncertainty_scores,
)
from ml_worker.active_learning.strategies import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    AdaptiveStrategy,
    FixesStrategy,
    HybridStrategy,
    RandomStrategy,
    ScoreStrategy,
    Strategy,
    TypicalStrategy,
    cost_weighted,
    get_strategy,
    k_center_greedy,
    rank,
    strategy_names,
)

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
    "rank",
    "get_strategy",
    "strategy_names",
    "k_center_greedy",
    "cost_weighted",
    "TileAnalysis",
    "analyze_tile",
    "analyze_tiles",
    "embed_tile",
    "output_kind",
    "find_bottleneck_module",
    "bottleneck_dropout",
    "TTA_TRANSFORMS",
    "CHEAP_SCORES",
    "uncertainty_scores",
    "pixel_entropy",
    "pixel_margin",
    "foreground_probability",
    "boundary_band",
    "correction_effort",
    "aggregate_effort",
    "kmeans",
    "typicality",
    "typical_diverse",
    "nucleus_scores",
    "instance_disagreement",
    "fix_rate",
    "expected_fixes_heatmap",
    "fit_temperature",
    "apply_temperature",
]
