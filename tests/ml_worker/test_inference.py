"""Tests for ml_worker.inference (tiled prediction with Gaussian blending)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch import nn

from ml_worker.data import preprocess
from ml_worker.inference import gaussian_importance_map, predict_instances, predict_probs
from ml_worker.instances import semantic_to_instances
from ml_worker.synth import generate

torch.set_num_threads(1)


class ToyNet(nn.Module):
    """3x3 conv + sigmoid: receptive field 3 px, so any tile overlap >= 2 px gives
    exactly the whole-image prediction away from the (padded) image border."""

    def __init__(self, size_divisor: int = 1, out_channels: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, out_channels, 3, padding=1, padding_mode="replicate")
        self.size_divisor = size_divisor
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2] % self.size_divisor == 0 and x.shape[-1] % self.size_divisor == 0
        return self.conv(x)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def to_instances(self, probs: np.ndarray) -> np.ndarray:
        return semantic_to_instances(probs[1])


def _whole(model: nn.Module, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(preprocess(image))[None]
    with torch.no_grad():
        return model.activation(model(x))[0].numpy()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img, _ = generate("he", (150, 203), seed=3)
    return img


def test_tiled_inference_equals_whole_image_inference(image):
    model = ToyNet()
    whole = _whole(model, image)
    tiled = predict_probs(model, image, tile_size=64, overlap=16, batch_size=3, device="cpu")
    assert tiled.shape == (2, 150, 203) and tiled.dtype == np.float32
    # The replicate-padded border of each tile differs from the image only at tile edges,
    # which the overlap hides except along the true image border, where both agree.
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_non_divisible_sizes_are_padded_to_the_model_stride(image):
    model = ToyNet(size_divisor=16)
    img = image[:97, :131]
    whole_padded = _whole(ToyNet(size_divisor=1), img)
    tiled = predict_probs(model, img, tile_size=50, overlap=0.25, device="cpu")
    assert tiled.shape == (2, 97, 131)
    # Interior pixels (away from the right/bottom padding) match the unpadded prediction.
    np.testing.assert_allclose(tiled[:, :-1, :-1], whole_padded[:, :-1, :-1], atol=1e-5)


def test_an_image_smaller_than_the_tile_is_padded_and_cropped_back(image):
    model = ToyNet(size_divisor=8)
    img = image[:37, :45]
    out = predict_probs(model, img, tile_size=256, overlap=32, device="cpu")
    assert out.shape == (2, 37, 45)
    ref = _whole(ToyNet(), img)
    np.testing.assert_allclose(out[:, :-1, :-1], ref[:, :-1, :-1], atol=1e-5)


def test_outputs_of_earlier_batches_are_released_before_the_next_forward():
    """Memory is bounded by one batch: at every forward, no earlier output is alive."""

    class Tracking(ToyNet):
        def __init__(self) -> None:
            super().__init__()
            self.refs: list[weakref.ref] = []
            self.max_alive = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.max_alive = max(self.max_alive, sum(r() is not None for r in self.refs))
            out = super().forward(x)
            self.refs.append(weakref.ref(out))
            return out

        def activation(self, logits: torch.Tensor) -> torch.Tensor:
            p = torch.sigmoid(logits)
            self.refs.append(weakref.ref(p))
            return p

    model = Tracking()
    img, _ = generate("pap", 160, seed=1)
    predict_probs(model, img, tile_size=32, overlap=8, batch_size=2, device="cpu")
    assert len(model.refs) >= 2 * 20  # many batches went through
    assert model.max_alive == 0


def test_gaussian_importance_map_peaks_at_the_centre():
    g = gaussian_importance_map((64, 64))
    assert g.shape == (64, 64) and g.max() == pytest.approx(1.0)
    assert g[32, 32] > g[32, 5] > g[0, 0] >= 1e-3


def test_predict_instances_uses_the_model_post_processing(image):
    model = ToyNet()
    inst, probs = predict_instances(model, image, tile_size=64, overlap=16, device="cpu")
    assert inst.shape == image.shape[:2] and inst.dtype == np.int32
    assert probs.shape == (2,) + image.shape[:2]


def test_the_model_mode_is_restored():
    model = ToyNet()
    model.train()
    predict_probs(model, np.zeros((20, 20, 3), np.uint8), tile_size=16, overlap=4, device="cpu")
    assert model.training


def test_a_plain_module_without_activation_gets_softmax():
    net = nn.Conv2d(3, 3, 1)
    out = predict_probs(net, np.full((10, 12, 3), 128, np.uint8), tile_size=8, overlap=2,
                        device="cpu")
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
