"""core.training units that the end-to-end runs in tests/train cannot isolate."""
from __future__ import annotations

import torch
from lightning_fabric import Fabric
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from core.training import seed_epoch


def test_seed_epoch_sets_the_distributed_samplers_epoch_from_the_run_not_the_process():
    fabric = Fabric(accelerator="cpu", devices=1)
    ds = TensorDataset(torch.arange(20))
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = fabric.setup_dataloaders(DataLoader(ds, batch_size=5, sampler=sampler), use_distributed_sampler=False)
    seed_epoch(fabric, loader, seed=0, stage=1, epoch=3)
    first = [int(v) for (b,) in loader for v in b]
    assert sampler.epoch == 3  # what an uninterrupted run's loader for this stage sets at epoch 3
    seed_epoch(fabric, loader, seed=0, stage=1, epoch=3)  # a resumed process, same epoch: same order
    assert [int(v) for (b,) in loader for v in b] == first
    seed_epoch(fabric, loader, seed=0, stage=1, epoch=4)
    assert [int(v) for (b,) in loader for v in b] != first


def test_seed_epoch_makes_augmentation_draws_depend_on_the_epoch_only():
    fabric = Fabric(accelerator="cpu", devices=1)
    draws = {}
    for epoch in (2, 3, 2):
        torch.rand(7)  # whatever ran before (other epochs, another process) must not matter
        seed_epoch(fabric, None, seed=5, stage=0, epoch=epoch)
        draws.setdefault(epoch, []).append(torch.rand(3).tolist())
    assert draws[2][0] == draws[2][1] and draws[2][0] != draws[3][0]


def test_seed_epoch_seeds_differ_across_runs_stages_and_epochs():
    """seed + stage + epoch offsets would give run seed s at epoch e+1 the draws of seed s+1 at epoch e."""
    fabric = Fabric(accelerator="cpu", devices=1)
    draws = set()
    for seed, stage, epoch in [(0, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1000)]:
        seed_epoch(fabric, None, seed=seed, stage=stage, epoch=epoch)
        draws.add(tuple(torch.rand(3).tolist()))
    assert len(draws) == 4



def test_a_runs_import_names_the_files_it_dropped_in_the_log(image_set):
    """A labels CSV whose photos are partly missing: the run's provenance keeps the counts, and the stage's log line
    names each dropped file (up to 20 per reason, then how many more)."""
    import pandas as pd

    from core.config import run_config_from_dict
    from core.training import dropped_lines, load_source
    from tests.conftest import tiny_config
    labels, images = image_set
    (images / "img003.png").unlink()
    pd.concat([pd.read_csv(labels)] + [pd.DataFrame({"image": [f"gone{i}.png"], "label": [0], "patient_id": [f"G{i}"]})
                                       for i in range(22)]).to_csv(labels, index=False)
    source = run_config_from_dict(tiny_config(labels, images)).stages[0].data[0]
    df, prov = load_source(source)
    assert len(df) == 39 and prov["dropped"] == {"image file missing": 23}
    names = prov["dropped_named"]["image file missing"]
    assert len(names) == 20 and names[0].endswith("img003.png")
    line, = dropped_lines([prov])
    assert line.startswith("  labels.csv: dropped 23, image file missing: ") and "img003.png" in line
    assert line.endswith("and 3 more")
