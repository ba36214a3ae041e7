"""train.build_demo --refresh-context: the shipped demo's context stage gains the fusion refits its photo + answers
intervals need, from its own validation patients, and only when the fusion they give is the stored one."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from core import builtin
from core.bundle import load_bundle
from core.context import FUSION_BOOT_KEYS, fuse
from train import build_demo

pytestmark = pytest.mark.slow


@pytest.fixture
def demo_without_refits(tmp_path):
    if not (build_demo.SHARED / "pad_ufes_20_subset" / "metadata.csv").is_file():
        pytest.skip(f"shared data not found under {build_demo.SHARED}")
    demo = tmp_path / "demo"
    shutil.copytree(builtin.DEMO_DIR, demo)
    meta = json.loads((demo / "bundle" / "model.json").read_text())
    meta["context"].pop("fusion_bootstrap", None)  # as the demo was shipped before the refits were kept
    (demo / "bundle" / "model.json").write_text(json.dumps(meta))
    return demo, meta


def test_refresh_context_gives_the_demo_its_fusion_refits_and_keeps_everything_else(demo_without_refits):
    demo, meta = demo_without_refits
    shipped = load_bundle(builtin.DEMO_BUNDLE)
    assert fuse(load_bundle(demo / "bundle").meta.context, 0.01, 0.5, {"bleed": "yes"}).ci95 is None
    assert build_demo.refresh_context(demo, "train/configs/shared_demo_context.yaml") == 1000
    after = load_bundle(demo / "bundle")
    assert after.meta.weights_sha256 == shipped.meta.weights_sha256
    assert after.meta.context.fusion == meta["context"]["fusion"]  # the stored fusion is kept, not replaced
    boot = after.meta.context.fusion_bootstrap
    assert boot["n"] == 74 and boot["unit"] == "patients"
    # the same refits as the committed demo's: the same photos, weights and seed (to float noise: the photos'
    # logits may differ in their last bits with the machine's threads and kernels)
    committed = shipped.meta.context.fusion_bootstrap
    assert {k: v for k, v in boot.items() if k not in FUSION_BOOT_KEYS} == {
        k: v for k, v in committed.items() if k not in FUSION_BOOT_KEYS}
    for key in FUSION_BOOT_KEYS:
        np.testing.assert_allclose(boot[key], committed[key], atol=1e-4)
    lo, hi = fuse(after.meta.context, 0.01, 0.5, {"bleed": "yes"}).ci95
    assert lo < fuse(after.meta.context, 0.01, 0.5, {"bleed": "yes"}).prob < hi


def test_refresh_context_writes_nothing_when_the_fusion_is_not_the_one_these_photos_give(demo_without_refits):
    demo, meta = demo_without_refits
    meta["context"]["fusion"]["intercept"] += 0.5  # not the fusion the demo's validation photos give
    (demo / "bundle" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="from the stored one"):
        build_demo.refresh_context(demo, "train/configs/shared_demo_context.yaml")
    assert json.loads((demo / "bundle" / "model.json").read_text()) == meta
