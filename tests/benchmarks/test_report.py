"""benchmarks/report.py over a whole class's results: a kind it has no table for is named, not a crash."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402

MACHINE = {"cpu": "AMD EPYC", "cores": 2, "torch": "2.14.1", "torch_threads": 2, "cpu_bf16": False,
           "load_avg_1min_at_start": 1.0, "load_avg_1min_at_end": 1.2, "date": "2026-11-30", "isa": ["avx2", "fma"],
           "isa_class": "avx2"}


def test_results_without_a_table_are_named_and_the_others_still_printed(tmp_path, capsys):
    (tmp_path / "lighting_builtin_demo_epyc-2c.json").write_text(json.dumps({"machine": MACHINE, "results": []}))
    (tmp_path / "decode_cache_epyc-2c.json").write_text(json.dumps({"machine": MACHINE, "pad_ufes_20": {
        "n": 10, "decode_ms": 2.8, "npy_hit_ms": 0.15, "png_hit_ms": 2.03, "npy_entry_kb": 192, "png_entry_kb": 91}}))
    assert report.main(sorted(str(p) for p in tmp_path.iterdir())) == 0
    out = capsys.readouterr().out
    assert "(no table here for lighting results" in out and "AMD EPYC, 2 cores (class avx2" in out
    assert "| pad_ufes_20 (n=10) | 2.8 | 0.15 | 2.03 | 192 / 91 |" in out  # the file after it is still tabled
