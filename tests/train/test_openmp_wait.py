"""train.fit makes OpenMP threads wait passively (set before torch loads libgomp), unless the environment says else."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = "import train.fit, torch; torch.ones(1 << 20).add_(1).sum()"  # a parallel region starts libgomp


@pytest.mark.parametrize("given, seen", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_libgomp_sees_the_wait_policy_train_fit_sets(given, seen):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_DISPLAY_ENV": "TRUE", "PYTHONPATH": str(ROOT)} | ({"OMP_WAIT_POLICY": given} if given else {})
    r = subprocess.run([sys.executable, "-c", RUN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if "OPENMP DISPLAY ENVIRONMENT" not in r.stderr + r.stdout:
        pytest.skip("this torch build's OpenMP runtime does not display its environment (not libgomp)")
    assert f"OMP_WAIT_POLICY = '{seen}'" in r.stderr + r.stdout
