"""Print the markdown tables of benchmarks/README.md from the results JSON files.

    python benchmarks/report.py benchmarks/results/*_xeon-2c.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def machine_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores ({', '.join(m.get('isa', []))}), torch {m['torch']}, "
            f"{m['torch_threads']} thread(s), bf16 native: {m['cpu_bf16']}, load average "
            f"{m['load_avg_1min_at_start']} -> {m.get('load_avg_1min_at_end', '?')}, {m['date']}")


def latency(d: dict) -> str:
    rows = ["| backbone | weights | naive ms | fast ms | ratio | max \\|dP\\| vs fp32 | max \\|dP\\| vs naive | "
            "CAM r (mean / min) | fast precision (feature error) | bf16 if forced: \\|dP\\|, CAM r min |",
            "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for name, r in d.items():
        if name in ("machine", "settings"):
            continue
        fp = r["fast_precision"]
        err = f" ({fp['feature_rel_err']:.2%})" if fp.get("feature_rel_err") is not None else ""
        forced = r.get("rejected_precision_if_forced")
        f = f"{forced['max_abs_prob_diff']:.4f}, {forced['cam_corr_min']:.3f}" if forced else "-"
        rows.append(f"| {name} | {r['weights']} | {r['naive_ms']:.0f} | {r['fast_ms']:.0f} | **{r['ratio']:.2f}x** | "
                    f"{r['max_abs_prob_diff']:.4f} | {r['max_abs_prob_diff_vs_naive']:.4f} | "
                    f"{r['cam_corr']:.4f} / {r['cam_corr_min']:.4f} | {fp['dtype']}{err} | {f} |")
    rows.append("")
    rows.append("| backbone | naive: decode / transform / forward / GradCAM ms | fast: decode / preprocess+quality / "
                "model+CAM ms |")
    rows.append("|---|---|---|")
    for name, r in d.items():
        if name in ("machine", "settings"):
            continue
        n, f = r["naive_breakdown_ms"], r["fast_breakdown_ms"]
        rows.append(f"| {name} | {n['decode']:.0f} / {n['transform']:.0f} / {n['forward']:.0f} / {n['gradcam']:.0f} | "
                    f"{f['decode']:.0f} / {f['preprocess']:.0f} / {f['model']:.0f} |")
    return "\n".join(rows)


def throughput(d: dict) -> str:
    mm = d["matmul_gflops"]
    rows = [f"Matmul floor (2048x2048): fp32 **{mm['fp32']:.0f} GFLOP/s**, bf16 **{mm['bf16']:.0f} GFLOP/s**; "
            f"12 MP JPEG draft decode {d['decode_12mp_jpeg_per_s_per_core']}/s per core; batch "
            f"{d['settings']['batch_size']}.", "",
            "| backbone | GFLOP/img fwd / train frozen / train full | screening img/s (ideal, eff.) | "
            "train frozen fp32 | frozen bf16 | unfrozen fp32 (ideal) | unfrozen bf16 (ideal, eff.) |",
            "|---|---|---|---:|---:|---:|---|"]
    for name, r in d.items():
        if not isinstance(r, dict) or "screening" not in r:
            continue
        g, s, t = r["gflops_per_image"], r["screening"], r["training"]
        rows.append(
            f"| {name} | {g['forward']:.2f} / {g['train_frozen_backbone']:.2f} / {g['train_unfrozen']:.2f} | "
            f"{s['images_per_s']:.1f} {s['precision']} ({s['ideal_images_per_s']:.0f}, {s['efficiency']:.0%}) | "
            f"{t['frozen_backbone_fp32']['images_per_s']:.1f} | {t['frozen_backbone_bf16_autocast']['images_per_s']:.1f} | "
            f"{t['unfrozen_fp32']['images_per_s']:.1f} ({t['unfrozen_fp32']['ideal_images_per_s']:.0f}) | "
            f"{t['unfrozen_bf16_autocast']['images_per_s']:.1f} ({t['unfrozen_bf16_autocast']['ideal_images_per_s']:.0f}, "
            f"{t['unfrozen_bf16_autocast']['efficiency']:.0%}) |")
    return "\n".join(rows)


def decode_cache(d: dict) -> str:
    rows = ["| photos | decode + resize ms | cache hit ms (npy) | cache hit ms (png) | entry KB npy / png |",
            "|---|---:|---:|---:|---|"]
    for name, r in d.items():
        if isinstance(r, dict) and "decode_ms" in r:
            rows.append(f"| {name} (n={r['n']}) | {r['decode_ms']:.1f} | {r['npy_hit_ms']:.2f} | {r['png_hit_ms']:.2f} | "
                        f"{r['npy_entry_kb']:.0f} / {r['png_entry_kb']:.0f} |")
    return "\n".join(rows)


def draft(d: dict) -> str:
    from draft_accuracy import table  # imports torch: only when a draft_accuracy file is reported
    return table(d)


def main(paths) -> int:
    for p in paths:
        d = json.loads(Path(p).read_text())
        kind = Path(p).name.split("_")[0]
        print(f"### {Path(p).name}\n\n{machine_line(d['machine'])}\n")
        print({"predict": latency, "throughput": throughput, "decode": decode_cache, "draft": draft}[kind](d))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
