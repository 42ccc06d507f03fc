"""The plot: records/s per workload and system, grouped bars (matplotlib, PNG).

matplotlib is imported here if the project's virtualenv has it; otherwise the plot is drawn
by the peers' virtualenv (which installs it) in a subprocess; without either, it is skipped
with a note.  Run as ``python -m bench.plot RESULTS.json OUT.png`` it draws from a results
file (this module imports only the standard library at the top)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List

WORKLOADS = (("stateless", "stateless (json → ~20 µs work → produce)"),
             ("stateful", "count and sum per key"),
             ("twostage", "group_by (repartition topic), then count and sum"))


def draw(rows: List[Dict[str, Any]], title: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a panel per workload measured
    panels = [(key, name) for key, name in WORKLOADS if any(r.get(key) for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        shown = [(r["system"], r[key]) for r in rows if r.get(key)]
        xs = list(range(len(shown)))
        rates = [w["rate"] or 0 if not w["unavailable"] else 0 for _s, w in shown]
        bars = ax.bar(xs, rates, color=["#4c72b0" if s.startswith("shardsup") else
                                        "#8c8c8c" if s == "raw loop" else "#dd8452"
                                        for s, _w in shown])
        for bar, (_s, w) in zip(bars, shown):
            text = ("unavailable" if w["unavailable"] else
                    f"{w['rate']:,.0f}" if w["rate"] else "failed")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8,
                        rotation=90 if w["unavailable"] or not w["rate"] else 0)
        ax.set_xticks(xs, [s for s, _w in shown], rotation=30, ha="right", fontsize=8)
        if key == "twostage":
            ratios = [f"{r['system'].replace('shardsup ', '')}: {r['twostage_vs_count']:.2f}×"
                      for r in rows if r.get("twostage_vs_count")]
            if ratios:
                name += "\n(÷ one-stage count: " + ", ".join(ratios) + ")"
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("records/s (steady)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def title_of(data: Dict[str, Any]) -> str:
    s = data["settings"]
    return (f"{s['records']:,} records, {s['partitions']} partitions, {data['cpus']} CPUs, "
            f"{data['time']}, {data['code'].split(',')[0]}")


def plot(rows: List[Dict[str, Any]], args: Any, out: str, peer_python: str = "") -> str:
    """Draws the PNG; returns one line saying where, or why not."""
    if not any(r.get(k) for r in rows for k, _n in WORKLOADS):
        return "plot: nothing to draw"
    json_path = out[:-len(".png")] + ".json"
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from .systems import peers

        python = peer_python or (peers.python() if os.path.exists(peers.python()) else "")
        if not python:
            return (f"plot skipped: matplotlib is not installed (the peers' virtualenv, made "
                    f"by --peers, has it; or: python -m bench.plot {json_path} {out})")
        proc = subprocess.run([python, "-m", "bench.plot", json_path, out],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return f"plot skipped: the peers' virtualenv could not draw it: {last}"
        return f"plot: {os.path.relpath(out)}"
    with open(json_path) as f:
        draw(rows, title_of(json.load(f)), out)
    return f"plot: {os.path.relpath(out)}"


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        loaded = json.load(fh)
    draw(loaded["systems"], title_of(loaded), sys.argv[2])
