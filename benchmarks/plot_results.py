"""Draw the benchmark figures (PNG) from benchmarks/data/*.json and link them from
results.md.

The benchmark scripts write their figures as data beside results.md
(``data/roundtrip.json``, ``data/codecs.json``, ``data/training.json``); this script
reads whichever are there and writes, into ``figures/`` beside results.md:

* ``latency-vs-size.png``: round-trip p50 (and p99) against tensor size for
  splitlearn-comm, the plain grpcio+numpy baseline, and the reference figures of the
  gRPC C-core floor and a plain grpcio echo of bytes (GRPC-CORE-NOTES.md);
* ``codec-bytes-vs-error.png``: bytes on the wire (relative to raw float32) against
  relative RMS error, per tensor;
* ``training-steps.png``: training steps per second, split against local.

It then replaces its own section of results.md (the "Figures" section between
``<!-- bench_figures (plot_results.py): begin -->`` and ``... end -->``). Needs
matplotlib (``make bench-figures`` installs it).

    python3 benchmarks/plot_results.py [--results benchmarks/results.md]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _report import write_section  # noqa: E402

BEGIN = "<!-- bench_figures (plot_results.py): begin (generated; rerunning the script replaces this part) -->"
END = "<!-- bench_figures (plot_results.py): end -->"

COLORS = {"splitlearn-comm": "#2563eb", "grpcio+numpy": "#dc2626",
          "plain grpcio echo of bytes": "#f59e0b",
          "gRPC C-core echo, no copies (floor)": "#6b7280"}


def _load(folder: str, name: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True,
                         "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.hashsalt": "splitlearn",
                         "path.simplify": False})
    return plt


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: stable files
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _size_label(n: float) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:g} {unit}"
    return f"{n:g} B"


def latency_vs_size(d: Dict[str, Any], out: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    one = [r for r in d["results"] if r["threads"] == 1]
    for impl in ("splitlearn-comm", "grpcio+numpy"):
        rows = sorted((r for r in one if r["impl"] == impl), key=lambda r: r["bytes"])
        if not rows:
            continue
        xs = [r["bytes"] for r in rows]
        ax.plot(xs, [r["p50_ms"] for r in rows], "o-", color=COLORS[impl],
                label=f"{impl}, p50 (this run)")
        ax.plot(xs, [r["p99_ms"] for r in rows], "o--", color=COLORS[impl], alpha=0.55,
                markersize=3, label=f"{impl}, p99")
    ref = d.get("reference_p50_ms") or {}
    sizes = ref.get("sizes_bytes", {})
    for name in ("plain grpcio echo of bytes", "gRPC C-core echo, no copies (floor)"):
        if name in ref:
            pts = sorted((sizes[k], v) for k, v in ref[name].items() if k in sizes)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s:", color=COLORS[name],
                    label=f"{name}, p50 (this run)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted({r["bytes"] for r in one})
    ax.set_xticks(ticks, [_size_label(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("tensor size (float32, each way)")
    ax.set_ylabel("round-trip latency, ms (log)")
    title = "Round trip: latency against size, one client thread"
    if d.get("quick"):
        title += " (quick run)"
    ax.set_title(title)
    ax.legend(fontsize=7.5, loc="upper left")
    return _save(fig, os.path.join(out, "latency-vs-size.png"))


def codec_bytes_vs_error(d: Dict[str, Any], out: str) -> str:
    plt = _plt()
    tensors: List[str] = []
    for r in d["rows"]:
        if r["tensor"] not in tensors:
            tensors.append(r["tensor"])
    fig, axes = plt.subplots(1, len(tensors), figsize=(4.0 * len(tensors), 4.2), squeeze=False,
                             sharey=True)
    floor = 1e-7  # where lossless rows are drawn on the log axis
    codecs: List[str] = []
    for r in d["rows"]:
        if r["codec"] not in codecs:
            codecs.append(r["codec"])
    cmap = plt.get_cmap("tab10")
    color = {c: cmap(i % 10) for i, c in enumerate(codecs)}
    for ax, tensor in zip(axes[0], tensors):
        for r in (r for r in d["rows"] if r["tensor"] == tensor):
            err = r["relative_rms_error"]
            y = err if err > 0 else floor
            ax.scatter(r["wire_over_raw"], y, s=42 if r["c"] else 26,
                       marker="o" if r["c"] else "x", color=color[r["codec"]],
                       label=r["codec"] if r["c"] else None, zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [0.25, 0.5, 1, 2, 4, 8]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlim(0.18, 10)
        ax.axhline(floor, color="#999", lw=0.6, ls=":")
        ax.set_yticks([floor, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
                      ["lossless", "1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "0.1"])
        ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_title(tensor)
        ax.set_xlabel("bytes on the wire / raw float32")
    axes[0][0].set_ylabel("relative RMS error (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen: Dict[str, Any] = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(8, len(seen)),
               fontsize=7, frameon=False)
    fig.suptitle("Codecs: bytes on the wire against error (dots: the C codecs; "
                 "crosses: the alternatives)", fontsize=9.5)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = os.path.join(out, "codec-bytes-vs-error.png")
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def training_steps(d: Dict[str, Any], out: str) -> str:
    plt = _plt()
    configs: List[str] = []
    for r in d["rows"]:
        if r["config"] not in configs:
            configs.append(r["config"])
    fig, axes = plt.subplots(1, len(configs), figsize=(3.6 * len(configs), 3.8), squeeze=False)
    for ax, config in zip(axes[0], configs):
        rows = [r for r in d["rows"] if r["config"] == config]
        names = [r["mode"] for r in rows]
        bars = ax.bar(names, [r["sps"] for r in rows],
                      color=["#6b7280" if n == "local" else "#2563eb" for n in names])
        for b, r in zip(bars, rows):
            ax.annotate(f"{r['vs_local']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7.5, xytext=(0, 2),
                        textcoords="offset points")
        ax.set_title(f"{config}")
        ax.set_ylabel("training steps per second")
        ax.margins(y=0.15)
    fig.suptitle("Training: steps/s, split (over the wire, by codec) against local "
                 "(label: relative to local)", fontsize=9.5)
    return _save(fig, os.path.join(out, "training-steps.png"))


def section(made: List[str], results_md: str, missing: List[str]) -> str:
    base = os.path.dirname(os.path.abspath(results_md))
    out = [BEGIN, "", "# Figures", "",
           "Drawn by `benchmarks/plot_results.py` (`make bench-figures`; `make bench` runs it "
           "last) from the data the scripts above wrote beside this file "
           "(`benchmarks/data/*.json`). Same runs, same caveats as the tables.", ""]
    captions = {
        "latency-vs-size.png": "Round-trip latency against tensor size (one client thread): "
                               "this run's splitlearn-comm and grpcio+numpy rows, and the C-core "
                               "floor and plain-grpcio figures of GRPC-CORE-NOTES.md.",
        "codec-bytes-vs-error.png": "Codecs: bytes on the wire against relative RMS error, "
                                    "per tensor.",
        "training-steps.png": "Training steps per second, split against local.",
    }
    for path in made:
        name = os.path.basename(path)
        rel = os.path.relpath(path, base)
        out += [f"![{captions[name]}]({rel})", "", f"*{captions[name]}*", ""]
    if missing:
        out += ["No data yet for: " + ", ".join(missing) + " (run the script that makes it).",
                ""]
    out.append(END)
    return "\n".join(out) + "\n"


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(HERE, "results.md"),
                   help="the results file (its data/ and figures/ folders are beside it)")
    args = p.parse_args(argv)
    base = os.path.dirname(os.path.abspath(args.results))
    data_dir, out = os.path.join(base, "data"), os.path.join(base, "figures")
    os.makedirs(out, exist_ok=True)
    made, missing = [], []
    for name, fn, script in (("roundtrip", latency_vs_size, "bench_roundtrip.py"),
                             ("codecs", codec_bytes_vs_error, "bench_codecs.py"),
                             ("training", training_steps, "bench_training.py")):
        d = _load(data_dir, name)
        if d is None:
            missing.append(script)
            continue
        made.append(fn(d, out))
        print(f"wrote {os.path.relpath(made[-1])}")
    write_section(args.results, section(made, args.results, missing), BEGIN, END)
    print(f"linked them from {os.path.relpath(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
