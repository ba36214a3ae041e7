"""core.dataset: the JPEG draft limits shared by training, evaluation, screening and the app."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.dataset import DRAFT_MARGIN, decode, decode_limits
from core.images import load_image
from core.quality import MIN_SIDE, WORK_LONG_SIDE


def _jpeg(w: int, h: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100 * np.sin(x / 97.0), 60 + 150 * x / w, 128 + 90 * np.cos(y / 131.0)], -1)
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_limits_keep_the_margin_and_the_quality_floors():
    assert decode_limits(256) == {"min_side": 359, "min_long": WORK_LONG_SIDE}  # ceil(1.4 * 256)
    assert decode_limits(256)["min_side"] >= DRAFT_MARGIN * 256
    assert decode_limits(100)["min_side"] == MIN_SIDE  # never so small that the photo is called "too small"


@pytest.mark.parametrize("size, expected", [
    ((4000, 3000), (500, 375)),   # a 12 MP 4:3 phone photo: 1/8
    ((3000, 4000), (375, 500)),   # the same in portrait
    ((3000, 3000), (750, 750)),   # 1/8 would give a 375 px long side, below the quality checks' working size
    ((4000, 2250), (1000, 563)),  # 16:9: 1/8 would give a 281 px short side, below 1.4 x 256
])
def test_phone_photos_decode_at_the_smallest_allowed_draft(size, expected):
    img = load_image(_jpeg(*size), **decode_limits(256))
    assert img.size == expected
    assert min(img.size) >= decode_limits(256)["min_side"] and max(img.size) >= WORK_LONG_SIDE


def test_training_decode_resizes_the_draft_to_the_short_side(tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(_jpeg(4000, 3000))
    img = decode(str(path), None, short_side=256)
    assert img.size == (341, 256)  # from the 1/8 draft, as the app decodes it


def test_augment_seed_fixes_each_items_augmentation_and_leaves_the_global_rng_alone(tmp_path):
    import pandas as pd
    import torch
    from torchvision import transforms as T

    from core.dataset import ManifestDataset
    paths = []
    for k in range(3):
        p = tmp_path / f"{k}.jpg"
        p.write_bytes(_jpeg(120 + 10 * k, 100))
        paths.append(str(p))
    ds = ManifestDataset(pd.DataFrame({"image": paths, "label": [0, 1, 0]}),
                         T.Compose([T.RandomResizedCrop(32), T.ToTensor()]), short_side=64)
    ds.set_augment_seed(7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = [ds[i][0] for i in range(3)]
    assert torch.equal(torch.get_rng_state(), before)  # dropout masks in the trainer do not depend on the data
    assert all(torch.equal(x, y) for x, y in zip(a, [ds[i][0] for i in range(3)]))  # same seed and item: same crop
    ds.set_augment_seed(8)
    assert not all(torch.equal(x, ds[i][0]) for i, x in enumerate(a))


def test_check_images_names_every_unusable_photo_and_refuses_what_screening_refuses(tmp_path):
    """Only the first 10 were named ('and 5 more'), and a GIF passed here though train.screen refuses it."""
    from PIL import Image

    from core.dataset import check_images
    from core.manifest import ManifestError
    Image.new("RGB", (40, 30), (90, 60, 40)).save(tmp_path / "ok.jpg")
    Image.new("RGB", (40, 30), (90, 60, 40)).save(tmp_path / "anim.gif")
    images = [str(tmp_path / "ok.jpg"), str(tmp_path / "anim.gif")] + [str(tmp_path / f"miss_{i}.jpg")
                                                                      for i in range(14)]
    with pytest.raises(ManifestError) as said:
        check_images(pd.DataFrame({"image": images, "label": 1}))
    lines = str(said.value).splitlines()
    assert lines[0] == "15 unusable image(s):" and len(lines) == 16
    assert "anim.gif: GIF format is not supported" in lines[1]
    assert all(f"miss_{i}.jpg: file not found" in lines[i + 2] for i in range(14))
