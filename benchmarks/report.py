"""Print the markdown tables of benchmarks/README.md from the results JSON files.

    python benchmarks/report.py benchmarks/results/*_xeon-2c.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def machine_line(m: dict) -> str:
    caps = ", ".join(f"{k}={v}" for k, v in (m.get("isa_caps") or {}).items())
    cls = (f"class {m['isa_class']}" + (f" ({caps})" if caps else "") + ": ") if m.get("isa_class") else ""
    ort = f", onnxruntime {m['onnxruntime']}" if m.get("onnxruntime") else ""
    isa = ", ".join(m.get("isa", [])) or f"no CPU flags; torch capability {m.get('cpu_capability', '?')}"
    return (f"{m['cpu']}, {m['cores']} cores ({cls}{isa}), torch {m['torch']}{ort}, "
            f"{m['torch_threads']} thread(s), bf16 native: {m['cpu_bf16']}, load average "
            f"{m['load_avg_1min_at_start']} -> {m.get('load_avg_1min_at_end', '?')}, {m['date']}")


def engines(d: dict) -> str:
    """The per-engine table (predict_latency.py --engines): each ratio is against the naive path of the same run."""
    rows = ["| backbone | naive ms | fast: pytorch ms (precision) | onnxruntime ms | auto ms (chose) | "
            "ratio naive / auto | max \\|dP\\| vs fp32: pytorch / onnxruntime | CAM r min: pytorch / onnxruntime | batch ms per image: "
            "screen pytorch / onnxruntime, embed pytorch / onnxruntime | load s: pytorch / onnxruntime / auto |",
            "|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for name, r in d.items():
        if name in ("machine", "settings") or not isinstance(r, dict) or "engines" not in r:
            continue
        e, b = r["engines"], (r.get("batch") or {}).get("ms_per_image", {})
        ms = {k: f"{x['fast_ms']:.0f}" for k, x in e.items()}
        dp = {k: f"{x['accuracy']['max_abs_prob_diff']:.4f}" for k, x in e.items()}
        cam = {k: f"{x['accuracy']['cam_corr_min']:.4f}" for k, x in e.items()}
        load = {k: f"{x['predictor_init_s']:.1f}" for k, x in e.items()}
        pt = f"{ms.get('pytorch', '-')} ({e['pytorch']['precision']['dtype']})" if "pytorch" in e else "-"
        auto = f"{ms['auto']} ({e['auto']['engine']['engine']})" if "auto" in e else "-"
        batch = [f"{b[k]:.1f}" if k in b else "-" for k in ("screen_pytorch", "screen_onnxruntime", "embed_pytorch",
                                                             "embed_onnxruntime")]
        rows.append(f"| {name} | {r['naive_ms']:.0f} | {pt} | {ms.get('onnxruntime', '-')} | {auto} | "
                    f"**{r['ratio']:.2f}x** | {dp.get('pytorch', '-')} / {dp.get('onnxruntime', '-')} | "
                    f"{cam.get('pytorch', '-')} / {cam.get('onnxruntime', '-')} | {batch[0]} / {batch[1]}, "
                    f"{batch[2]} / {batch[3]} | "
                    + " / ".join(load.get(k, "-") for k in ("pytorch", "onnxruntime", "auto")) + " |")
    return "\n".join(rows)


def latency(d: dict) -> str:
    if any(isinstance(r, dict) and "engines" in r for k, r in d.items() if k not in ("machine", "settings")):
        return engines(d) + "\n\n" + breakdown(d)
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
    return "\n".join(rows) + "\n\n" + breakdown(d)


def breakdown(d: dict) -> str:
    rows = ["| backbone | naive: decode / transform / forward / GradCAM ms | fast: decode / preprocess+quality / "
            "model+CAM ms |"]
    rows.append("|---|---|---|")
    for name, r in d.items():
        if name in ("machine", "settings"):
            continue
        n, f = r["naive_breakdown_ms"], r["fast_breakdown_ms"]
        if "engines" in r:  # one line per engine
            for e, x in r["engines"].items():
                g = x["fast_breakdown_ms"]
                rows.append(f"| {name} ({e}) | {n['decode']:.0f} / {n['transform']:.0f} / {n['forward']:.0f} / "
                            f"{n['gradcam']:.0f} | {g['decode']:.0f} / {g['preprocess']:.0f} / {g['model']:.0f} |")
            continue
        rows.append(f"| {name} | {n['decode']:.0f} / {n['transform']:.0f} / {n['forward']:.0f} / {n['gradcam']:.0f} | "
                    f"{f['decode']:.0f} / {f['preprocess']:.0f} / {f['model']:.0f} |")
    return "\n".join(rows)


def throughput(d: dict) -> str:
    mm = d["matmul_gflops"]
    rows = [f"Matmul floor (2048x2048): fp32 **{mm['fp32']:.0f} GFLOP/s**, bf16 **{num(mm['bf16'], '.0f')} GFLOP/s**; "
            f"12 MP JPEG draft decode {d['decode_12mp_jpeg_per_s_per_core']}/s per core; batch "
            f"{d['settings']['batch_size']}." + (f" bf16 {d['bf16']}." if d.get("bf16", "measured") != "measured" else ""),
            "",
            "| backbone | GFLOP/img fwd / train frozen / train full | screening img/s (ideal, eff.) | "
            "train frozen fp32 | frozen bf16 | unfrozen fp32 (ideal) | unfrozen bf16 (ideal, eff.) |",
            "|---|---|---|---:|---:|---:|---|"]
    for name, r in d.items():
        if not isinstance(r, dict) or "screening" not in r:
            continue
        g, s, t = r["gflops_per_image"], r["screening"], r["training"]
        full16 = t["unfrozen_bf16_autocast"]
        rows.append(
            f"| {name} | {g['forward']:.2f} / {g['train_frozen_backbone']:.2f} / {g['train_unfrozen']:.2f} | "
            f"{s['images_per_s']:.1f} {s['precision']} ({s['ideal_images_per_s']:.0f}, {s['efficiency']:.0%}) | "
            f"{t['frozen_backbone_fp32']['images_per_s']:.1f} | {num(t['frozen_backbone_bf16_autocast']['images_per_s'], '.1f')} | "
            f"{t['unfrozen_fp32']['images_per_s']:.1f} ({t['unfrozen_fp32']['ideal_images_per_s']:.0f}) | " +
            (f"{full16['images_per_s']:.1f} ({full16['ideal_images_per_s']:.0f}, {full16['efficiency']:.0%}) |"
             if full16["images_per_s"] is not None else "n/a |"))
    return "\n".join(rows)


def num(value, spec: str) -> str:
    """A number in `spec`, or 'n/a' (right-aligned to the spec's width, if any) for one not measured."""
    return format(value, spec) if value is not None else format("n/a", f">{spec.split('.')[0] or 0}")


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


TABLES = {"predict": latency, "throughput": throughput, "decode": decode_cache, "draft": draft}


def main(paths) -> int:
    for p in paths:
        d = json.loads(Path(p).read_text(encoding="utf-8"))
        kind = Path(p).name.split("_")[0]
        print(f"### {Path(p).name}\n\n{machine_line(d['machine'])}\n")
        # the other scripts' results (recipe_time, lighting, ...) are tabled by the script itself when it runs
        print(TABLES[kind](d) if kind in TABLES else f"(no table here for {kind} results: the script printed its own "
                                                      "when it ran; the numbers are in the JSON)")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
