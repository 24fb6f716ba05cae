"""The HoVer-Net-style instance head (``instance_head="hv"``): targets, loss, post-processing,
and the shared model contract for an architecture that carries it."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from ml_worker.checkpoint import load_checkpoint, save_checkpoint
from ml_worker.instance_heads import hv_loss, hv_targets, hv_targets_numpy, hv_to_instances
from ml_worker.instances import semantic_to_instances
from ml_worker.metrics import aji
from ml_worker.models import create_model
from tests.ml_worker.test_models import ModelContract, disc_batch, overfitted  # noqa: F401 (fixture)

torch.set_num_threads(1)


def touching_discs(size: int = 96) -> np.ndarray:
    """Rows of discs that overlap a little: a binary mask cannot tell them apart by its
    distance transform alone when the necks are wide."""
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    label = 0
    for cy in (20, 48, 76):
        for cx in (18, 34, 50, 66):
            label += 1
            inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= 9.5 ** 2) & (inst == 0)] = label
    return inst


def test_targets_span_minus_one_to_one_inside_each_nucleus_and_zero_outside() -> None:
    inst = touching_discs()
    hv = hv_targets_numpy(inst)
    assert hv.shape == (2, *inst.shape)
    assert np.all(hv[:, inst == 0] == 0)
    for label in (1, 6, 12):
        h = hv[0][inst == label]
        v = hv[1][inst == label]
        assert h.min() == pytest.approx(-1.0, abs=1e-6) or h.max() == pytest.approx(1.0, abs=1e-6)
        assert abs(h.mean()) < 0.1 and abs(v.mean()) < 0.1  # centred on the centre of mass
    # Left of a centre the horizontal map is negative, right of it positive.
    ys, xs = np.nonzero(inst == 1)
    cx = xs.mean()
    assert np.all(hv[0][ys[xs < cx - 1], xs[xs < cx - 1]] < 0)
    assert np.all(hv[0][ys[xs > cx + 1], xs[xs > cx + 1]] > 0)


def test_targets_of_a_batch_are_computed_per_image() -> None:
    inst = torch.from_numpy(touching_discs().astype(np.int64))
    batch = torch.stack([inst, torch.flip(inst, dims=[1])])
    t = hv_targets(batch)
    torch.testing.assert_close(t[1, 1], torch.flip(t[0, 1], dims=[1]))
    torch.testing.assert_close(t[1, 0], -torch.flip(t[0, 0], dims=[1]), atol=1e-5, rtol=0)


def test_perfect_maps_separate_touching_nuclei_better_than_the_distance_transform() -> None:
    inst = touching_discs()
    fg = (inst > 0).astype(np.float32)
    hv = hv_targets_numpy(inst)
    from_maps = hv_to_instances(fg, hv)
    from_mask = semantic_to_instances(fg)
    assert from_maps.max() == inst.max() == 12
    assert aji(from_maps, inst) > 0.9
    assert aji(from_maps, inst) > aji(from_mask, inst)


def test_loss_is_zero_for_the_target_maps_and_positive_otherwise() -> None:
    inst = torch.from_numpy(touching_discs().astype(np.int64))[None]
    target = hv_targets(inst)
    perfect = torch.atanh(target.clamp(-0.999999, 0.999999))
    assert float(hv_loss(perfect, inst)) < 1e-6
    assert float(hv_loss(torch.zeros_like(perfect), inst)) > 0.05


def test_it_refuses_an_unknown_head_and_a_model_with_its_own_instance_outputs() -> None:
    with pytest.raises(ValueError, match="unknown instance_head"):
        create_model("unet", width=4, depth=2, instance_head="stardust")
    with pytest.raises(ValueError, match="own instance outputs"):
        create_model("multihead_unet", width=4, depth=2, instance_head="hv")


def test_checkpoint_keeps_the_head(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = create_model("dssnet", **TestDSSNetWithHVHead.kwargs).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    back, _ = load_checkpoint(tmp_path / "m.pt")
    assert back.instance_head == "hv" and back.num_classes == 2 and back.out_channels == 4
    x = disc_batch()["image"]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), model(x))


class _HVContract(ModelContract):
    """The contract's overfit stops once the foreground Dice is high; the distance maps need
    more steps than the foreground, so the head's runs train on for a fixed number of steps."""

    extra_steps: ClassVar[int] = 150

    def run_overfit(self) -> dict[str, Any]:
        result = super().run_overfit()
        model, batch = result["model"], result["batch"]
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        for _ in range(self.extra_steps):
            opt.zero_grad()
            loss, _ = model.compute_loss(model.forward_train(batch["image"]), batch)
            loss.backward()
            opt.step()
        result["model"] = model.eval()
        return result

    # A known defect, not a pass: on this 64-px batch the HV post-processing splits the touching
    # pair into 2, 3 or 4 instances depending on the step and on the CPU's floating-point path
    # (3 on the machine the test was written on, 2 on an AMD EPYC at the same seed, and it keeps
    # flipping between 2 and 4 up to 1,200 steps). The standard benchmark agrees: the hv head
    # lowers AJI (docs/ml_worker.md). Kept as a non-strict xfail so a fix shows up as XPASS.
    @pytest.mark.slow
    @pytest.mark.xfail(reason="HV post-processing is unstable on touching discs (issue 15, open)", strict=False)
    def test_overfitted_model_gives_one_instance_per_disc_even_when_touching(
            self, overfitted: dict[str, Any]) -> None:  # noqa: F811 (the fixture, as in the parent)
        super().test_overfitted_model_gives_one_instance_per_disc_even_when_touching(overfitted)


class TestUNetWithHVHead(_HVContract):
    arch = "unet"
    kwargs: ClassVar[dict[str, Any]] = {"width": 8, "depth": 3, "instance_head": "hv"}

    def test_activation_gives_probabilities(self, batch: dict[str, torch.Tensor]) -> None:
        model = self.make().eval()
        with torch.no_grad():
            out = model.activation(model(batch["image"]))
        probs, maps = out[:, :2], out[:, 2:]
        assert out.shape[1] == 4
        torch.testing.assert_close(probs.sum(dim=1), torch.ones_like(probs[:, 0]))
        assert ((maps >= -1) & (maps <= 1)).all()


class TestDSSNetWithHVHead(_HVContract):
    arch = "dssnet"
    kwargs: ClassVar[dict[str, Any]] = {"width": 8, "feature_channels": 16, "expand_channels": 16, "num_blocks": 2,
                                        "decoder_channels": 16, "sr_channels": 8, "sr_blocks": 1,
                                        "instance_head": "hv"}
    train_keys: ClassVar[set[str]] = {"seg", "sr", "edge"}
    max_steps: ClassVar[int] = 200
    extra_steps: ClassVar[int] = 300

    def test_activation_gives_probabilities(self, batch: dict[str, torch.Tensor]) -> None:
        model = self.make().eval()
        with torch.no_grad():
            out = model.activation(model(batch["image"]))
        torch.testing.assert_close(out[:, :2].sum(dim=1), torch.ones_like(out[:, 0]))
