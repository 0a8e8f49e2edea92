"""``make bench``: every benchmark, one JSON and one markdown report (and the layer plot).

    python -m bench.run [--quick] [--threads N] [--out DIR]

Writes ``<out>/<machine>-<date>.json`` (all rows, with the machine description and the load
average before and after) and ``.md`` (the targets table and every table), plus the MoE layer
plot ``.png``. ``--out`` defaults to ``bench/results``. ``--quick`` runs only the coarse fp32 layer
shape (the same as ``python -m bench.moe_layer --quick``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

from . import moe_layer, routers, train_step
from .common import RESULTS_DIR, machine_info, machine_tag, md_table, set_threads, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--skip", default="", help="comma-separated: layer,routers,train")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    info = machine_info()
    t0 = time.perf_counter()
    print(
        f"# moelab benchmarks on {info['cpu']} ({info['cores']} cores, {info['threads']} threads), load {info['loadavg_1_5_15']}"
    )
    layer_rows = [] if "layer" in skip else moe_layer.run(quick=args.quick)
    router_rows = [] if (args.quick or "routers" in skip) else routers.run()
    print(f"({time.perf_counter() - t0:.0f} s elapsed)")
    train_rows = [] if (args.quick or "train" in skip) else train_step.run()
    end = machine_info()
    info["loadavg_end"], info["parallel_region_us_end"] = end["loadavg_1_5_15"], end["parallel_region_us"]
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    ours = "moelab_fast"
    stem = f"{machine_tag()}-{_dt.date.today().isoformat()}" + ("-quick" if args.quick else "")
    payload = {"machine": info, "moe_layer": layer_rows, "routers": router_rows, "train_step": train_rows}
    write_json(args.out / f"{stem}.json", payload)
    parts = [moe_layer.markdown_report(layer_rows, info, ours)] if layer_rows else []
    if train_rows:
        parts += ["## Training step (MoELM vs OLMoE)", "", train_step.format_rows(train_rows), ""]
        auto = next((r for r in train_rows if r["impl"] == "moelab_auto" and "error" not in r), None)
        if auto and auto.get("x_best_olmoe") is not None:
            judged = []
            for key, label in (
                ("x_olmoe_default", "vs OLMoE's default experts implementation (grouped_mm)"),
                ("x_best_olmoe", "vs OLMoE's fastest experts implementation here"),
            ):
                v = auto.get(key)
                if v is not None:
                    judged.append([f"MoELM train step >= 1.25x OLMoE tokens/s, {label}", f"{v:.2f}x",
                                   "met" if v >= 1.25 else f"gap {1.25 - v:.2f}x"])  # fmt: skip
            parts += [md_table(["target", "measured", "status"], judged), ""]
    if router_rows:
        parts += ["## Router cost", "", routers.format_rows([r for r in router_rows if "error" not in r],
                                                              [r for r in router_rows if "error" in r]), ""]  # fmt: skip
    parts += [f"Total wall time {info['wall_s']} s."]
    (args.out / f"{stem}.md").write_text("\n".join(parts) + "\n")
    if layer_rows:
        moe_layer.plot(layer_rows, args.out / f"{stem}.png")
    print(
        f"\nwrote {args.out / stem}.{{json,md" + (",png}" if layer_rows else "}") + f" in {info['wall_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
