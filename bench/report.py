#!/usr/bin/env python3
"""Render the Markdown tables of bench/RESULTS.md from the JSON lines the bench scripts wrote.

  python bench/report.py --results bench/results > /tmp/tables.md

Reads (the LAST line of each kind unless --all): compare.jsonl (compare_peer.py), infer.jsonl (infer.py),
train.jsonl (train_step.py), pipeline.jsonl (pipeline.py), peak.jsonl (the peer's machine_peak.py output).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def last(path: Path, script: str | None = None) -> dict | None:
    if not path.is_file():
        return None
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip().startswith("{")]
    if script:
        rows = [r for r in rows if r.get("script") == script]
    return rows[-1] if rows else None


def all_rows(path: Path, script: str | None = None) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip().startswith("{")]
    return [r for r in rows if not script or r.get("script") == script]


def f(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def compare_table(c: dict) -> str:
    """The targets of one compare_peer.py summary; each peer figure names the peer layout that gave it."""
    out = ["| target | ours (best) | peer (best) | ratio ours/peer | goal | met | max foreign CPU |",
           "|---|---|---|---|---|---|---|"]
    for name, t in c["targets"].items():
        if name == "cascade_infer_b1":
            o, p1, p2 = t["ours_s"], t["peer_stage1_s"], t["peer_stage2_s"]
            out.append(f"| cascade inference {c['size']} px, batch 1 (s) | {o['value']:.3f} ({o['precision']}, "
                       f"{o['variant']}) | {t['peer_cascade_s']:.3f} (S1 {p1['value']:.3f} {p1.get('layout', '')} "
                       f"+ S2 {p2['value']:.3f} {p2.get('layout', '')}) | **{t['ratio_ours_over_peer']:.2f}** | "
                       f"{t['target']} | {'yes' if t['met'] else 'no'} | {f(t['max_foreign_cpu_frac'], 2)} |")
        elif name.endswith("_infer_b1"):
            o, p = t["ours_s"], t["peer_s"]
            out.append(f"| {name.split('_')[0]} stage inference, batch 1 (s) | {o['value']:.3f} ({o['precision']}, "
                       f"{o['variant']}) | {p['value']:.3f} ({p.get('layout', '')}) | {t['ratio_ours_over_peer']:.2f} "
                       f"| – | – | {f(max(o['foreign_cpu_frac'] or 0, p['foreign_cpu_frac'] or 0), 2)} |")
        elif "_train_memory_" in name:
            o, p = t["ours_peak_rss_mib"], t["peer_peak_rss_mib"]
            what = name.split("_train_memory_")[1].replace("px_b", " px, batch ")
            out.append(f"| {name.split('_')[0]} training peak RSS, {what} (MiB) | {o['value']:.0f} ({o['precision']}, "
                       f"{o.get('batch_norm') or 'keras'} BN) | {p['value']:.0f} ({p.get('layout', '')}) | "
                       f"**{t['ratio_ours_over_peer']:.2f}** | {t['target']} | {'yes' if t['met'] else 'no'} | – |")
        else:
            o, p = t["ours_img_s"], t["peer_img_s"]
            bn = f", {o['batch_norm']} BN" if o.get("batch_norm") else ""
            out.append(f"| {name.split('_')[0]} training {c['size']} px, {name.split('_')[-1]} (img/s) | "
                       f"{o['value']:.3f} ({o['precision']}{bn}) | {p['value']:.3f} ({p.get('layout', '')}) | "
                       f"**{t['ratio_ours_over_peer']:.2f}** | {t['target']} | {'yes' if t['met'] else 'no'} | "
                       f"{f(t['max_foreign_cpu_frac'], 2)} |")
    return "\n".join(out)


def infer_table(rows: list[dict]) -> str:
    out = ["| source | variant | precision | target | batch | median s/batch | s/image | trace s | foreign CPU |",
           "|---|---|---|---|---|---|---|---|---|"]
    for res in rows:
        for r in res["results"]:
            if "median_s" not in r:
                out.append(f"| {r['source']} | {r.get('variant')} | {r['precision']} | {r['target']} | {r['batch']} "
                           f"| error: {r.get('error', '')[:60]} | | | |")
                continue
            jit = " (XLA)" if r.get("jit") == "on" else ""
            out.append(f"| {r['source']} | {r.get('variant')}{jit} | {r['precision']} | {r['target']} | {r['batch']} | "
                       f"{r['median_s']:.3f} | {r['per_image_s']:.3f} | {f(r.get('trace_s'), 1)} | "
                       f"{f(r['foreign_cpu_frac'], 2)} |")
    return "\n".join(out)


def train_table(rows: list[dict]) -> str:
    out = ["| stage | precision | batch | median s/step | images/s | peak RSS MiB | trace s | foreign CPU |",
           "|---|---|---|---|---|---|---|---|"]
    for res in rows:
        for r in res["results"]:
            if "images_per_s" not in r:
                out.append(f"| {r['stage']} | {r['precision']} | {r['batch']} | {r.get('error', '')[:80]} | | | | |")
                continue
            out.append(f"| {r['stage']} | {r['precision']} | {r['batch']} | {r['median_s']:.2f} | "
                       f"{r['images_per_s']:.3f} | {r['peak_rss_mib']:.0f} | {f(r.get('trace_s'), 1)} | "
                       f"{f(r['foreign_cpu_frac'], 2)} |")
    mb = [(k, v) for res in rows for k, v in res.get("max_batch", {}).items()]
    if mb:
        out += ["", "| stage/precision | largest batch run | RSS fit (MiB + MiB/image) | extrapolated max batch "
                "for 24 GiB | stopped because |", "|---|---|---|---|---|"]
        for k, v in mb:
            fit = v.get("rss_fit_mib") or {}
            est = [val for key, val in v.items() if key.startswith("extrapolated")]
            out.append(f"| {k} | {v['largest_run']} | {f(fit.get('intercept'), 0)} + {f(fit.get('per_image'), 0)} "
                       f"| {f(est[0] if est else None)} | {v.get('stopped') or ''} |")
    return "\n".join(out)


def pipeline_table(res: dict) -> str:
    if res.get("skipped"):
        return f"skipped: {res['skipped']}"
    out = ["| stage | batch | pipeline images/s | CPU s/image | cache fill (epoch 1) s | training images/s "
           "(fastest measured) | ratio | goal >= 3 | foreign CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        out.append(f"| {r['stage']} | {res['batch']} | {r['images_per_s_mean']:.1f} | {f(r['cpu_s_per_image'], 4)} | "
                   f"{r['cache_fill_epoch_s']:.1f} | {f(r.get('training_images_per_s'))} | "
                   f"**{f(r.get('ratio_pipeline_over_training'), 1)}** | "
                   f"{'yes' if r.get('target_met') else ('no' if 'target_met' in r else '–')} | "
                   f"{f(r['foreign_cpu_frac'], 2)} |")
    return "\n".join(out)


def flops_table(inf: dict, cmp: dict | None) -> str:
    fl = inf.get("flops_per_image")
    if not fl:
        return ""
    peer = {}
    if cmp:
        for stage in ("lung", "infection"):
            for item in cmp["all_runs"]["peer_infer_b1"].get(stage, []):
                if item[2].get("fwd_flops_per_img"):
                    peer[stage] = item[2]["fwd_flops_per_img"]
    out = ["| stage | ours conv/dense GFLOP (peer's rule) | ours TF-profiler GFLOP (all ops) | peer GFLOP | "
           "ours params |", "|---|---|---|---|---|"]
    for stage in ("lung", "infection"):
        s = fl[stage]
        out.append(f"| {stage} | {s['conv_dense_from_shapes']['total'] / 1e9:.1f} | "
                   f"{f((s['tf_profiler_total'] or 0) / 1e9, 1)} | {f(peer.get(stage, 0) / 1e9, 1)} | "
                   f"{s['params']:,} |")
    return "\n".join(out)


def agreement_table(inf: dict) -> str:
    ag = inf.get("agreement_vs_fp32")
    if not ag:
        return ""
    out = ["| vs fp32/plain | stage 1 max abs dp | stage 2 max abs dp (same input) | stage 1 mask Dice | "
           "stage 2 mask Dice | cascade infection mask Dice | severity max abs (pct points) | within tolerance |",
           "|---|---|---|---|---|---|---|---|"]
    for name, a in ag.items():
        if not isinstance(a, dict) or not isinstance(a.get("lung_prob"), dict):
            continue
        out.append(f"| {name} | {a['lung_prob']['max_abs']:.2g} | {a['infection_prob_same_input']['max_abs']:.2g} | "
                   f"{a['lung_prob']['mask_dice']:.4f} | {a['infection_prob_same_input']['mask_dice']:.4f} | "
                   f"{a['cascade_infection_mask_dice']:.4f} | {a['severity_total_max_abs_pct']:.3f} | "
                   f"{'yes' if a['within_tolerance'] else 'NO'} |")
    out.append(f"\nTolerance: {json.dumps(ag.get('tolerance'))}; inputs: {ag.get('inputs')}; reference probability "
               f"range: {json.dumps(ag.get('reference_prob_range'))}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--all", action="store_true", help="every infer/train line, not just the last")
    a = ap.parse_args()
    d = Path(a.results)
    cmp = last(d / "compare.jsonl", "compare_peer")
    inf_all = all_rows(d / "infer.jsonl", "infer")
    train_rows = all_rows(d / "train.jsonl", "train_step")
    timed = [r for r in inf_all if r.get("results")]
    inf_rows = timed if a.all else timed[-1:]
    if not a.all:
        train_rows = [r for r in train_rows if r.get("size") == (train_rows[-1]["size"] if train_rows else None)]
    pipe = last(d / "pipeline.jsonl", "pipeline")
    peak = last(d / "peak.jsonl")
    if peak:
        print(f"Machine ceilings (peer's machine_peak.py, 2 threads): fp32 GEMM {peak['gemm_fp32_gflops']} GFLOP/s, "
              f"bf16 GEMM {peak['gemm_bf16_gflops']} GFLOP/s, copy {peak['copy_gb_s_rw']} GB/s\n")
    if cmp:
        print("### Targets (compare_peer.py, alternating runs)\n\n" + compare_table(cmp) + "\n")
    if inf_rows:
        print("### Inference latency (infer.py)\n\n" + infer_table(inf_rows) + "\n")
    with_flops = [r for r in inf_all if r.get("flops_per_image")]
    if with_flops:
        print(f"### FLOPs per image at {with_flops[-1]['size']} px\n\n" + flops_table(with_flops[-1], cmp) + "\n")
    for res in inf_all if a.all else [r for r in inf_all if r.get("agreement_vs_fp32")][-2:]:
        if res.get("agreement_vs_fp32"):
            print(f"### Variants vs fp32/plain, same weights ({res['weights']})\n\n" + agreement_table(res) + "\n")
    if train_rows:
        print("### Training throughput (train_step.py)\n\n" + train_table(train_rows) + "\n")
    if pipe:
        print("### Input pipeline (pipeline.py)\n\n" + pipeline_table(pipe) + "\n")


if __name__ == "__main__":
    main()
