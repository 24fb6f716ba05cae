from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from PIL import Image as PILImage

from backend.common.storage import read_label_map
from backend.images.models import Annotation, Image, Tile
from backend.projects.models import Project
from ml_worker import synth

pytestmark = pytest.mark.django_db
CPM15 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cpm15"


def test_it_imports_a_synthetic_folder_with_exact_masks(tmp_path, capsys):
    names = synth.write_dataset(tmp_path / "ds", 2, kind="he", size=(300, 200), seed=5)
    call_command("import_dataset", str(tmp_path / "ds"), "--project", "synthetic", "--tile-size", "128")
    project = Project.objects.get(name="synthetic")
    assert Image.objects.filter(project=project).count() == 2
    # 200 wide x 300 high at tile 128: x in (0, 72), y in (0, 128, 172) -> 6 tiles per image
    assert Tile.objects.filter(project=project).count() == 12
    image = Image.objects.get(name=f"{names[0]}.png")
    truth = np.asarray(PILImage.open(tmp_path / "ds" / "masks" / f"{names[0]}.png")).astype(np.int32)
    for tile in Tile.objects.filter(image=image):
        annotation = Annotation.objects.get(tile=tile)
        assert annotation.source == "imported" and annotation.status == "reviewed"
        assert np.array_equal(read_label_map(annotation.mask.name), truth[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w])
    assert "imported 2 images" in capsys.readouterr().out


def test_importing_the_same_folder_twice_adds_nothing(tmp_path):
    synth.write_dataset(tmp_path / "ds", 2, kind="pap", size=128, seed=1)
    call_command("import_dataset", str(tmp_path / "ds"), "--project", "p", "--tile-size", "128")
    call_command("import_dataset", str(tmp_path / "ds"), "--project", "p")
    assert Image.objects.count() == 2 and Annotation.objects.count() == 2


def test_a_folder_with_problems_imports_nothing_and_lists_every_problem(tmp_path):
    root = tmp_path / "ds"
    synth.write_dataset(root, 3, kind="he", size=64, seed=1)
    names = sorted(p.stem for p in (root / "images").iterdir())
    (root / "masks" / f"{names[0]}.png").unlink()  # image without its mask
    PILImage.fromarray(np.zeros((32, 64), np.uint16)).save(root / "masks" / f"{names[1]}.png")  # wrong size
    PILImage.fromarray(np.zeros((64, 64), np.uint16)).save(root / "masks" / "stray.png")  # mask without image
    with pytest.raises(CommandError) as error:
        call_command("import_dataset", str(root), "--project", "broken")
    message = str(error.value)
    assert "3 problem(s)" in message
    assert f"images/{names[0]}.png has no mask" in message and "but the tile is 64x64" in message
    assert "masks/stray.png has no image" in message
    assert Image.objects.count() == 0 and Annotation.objects.count() == 0


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CommandError, match="no images/ folder"):
        call_command("import_dataset", str(tmp_path / "nowhere"), "--project", "x")


@pytest.mark.skipif(not CPM15.exists(), reason="the shared CPM-15 data set is not on this machine")
def test_it_imports_cpm15_with_all_2905_nuclei(capsys):
    call_command("import_dataset", str(CPM15), "--project", "cpm15")
    out = capsys.readouterr().out
    assert "imported 15 images" in out and "2905 nuclei" in out
    assert Image.objects.count() == 15
