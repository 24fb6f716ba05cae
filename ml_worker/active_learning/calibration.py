"""Temperature of a trained model, fitted on its held-out (validation) tiles.

Uncertainty scores of two model versions are only comparable when their probabilities mean
the same thing; a network trained a few epochs on few tiles is typically over- or
under-confident by a different amount each time. One scalar ``T`` per model version, fitted
by minimising the pixel NLL of the nucleus / background labels of the frozen validation split
(``nuclei.fit_temperature``), fixes most of that (Guo et al., ICML 2017). The platform stores
it with the model version and passes it to ``analyze_tile(temperature=...)``; the predicted
masks do not change (for two classes, tempering keeps p = 0.5 where it is), only the scores.

Fitted on nucleus vs background: for a model with several nucleus classes the same ``T`` then
scales all class logits (an approximation; the scores read the nucleus probability).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ml_worker.active_learning.nuclei import fit_temperature

if TYPE_CHECKING:
    from torch import nn

    from ml_worker.data import Sample

__all__ = ["fit_model_temperature"]


def fit_model_temperature(model: "nn.Module", samples: Sequence["Sample"], *, normalizer: Any = None,
                          tile_size: int = 256, device: Any = None, max_samples: int = 16) -> float:
    """T for ``apply_temperature`` from ``model``'s predictions on (at most ``max_samples``)
    labelled held-out ``samples``; 1.0 when there are none."""
    from ml_worker.active_learning.analysis import _class_probs, output_kind
    from ml_worker.active_learning.scores import foreground_probability
    from ml_worker.inference import predict_probs

    fgs, targets = [], []
    kind = None
    for s in list(samples)[: int(max_samples)]:
        probs = predict_probs(model, s.image, tile_size=tile_size, normalizer=normalizer, device=device)
        kind = kind or output_kind(model, probs.shape[0])
        fgs.append(foreground_probability(_class_probs(model, probs), kind)[None])
        targets.append(np.asarray(s.instances) > 0)
    if not fgs:
        return 1.0
    return fit_temperature(fgs, targets, kind="sigmoid")
