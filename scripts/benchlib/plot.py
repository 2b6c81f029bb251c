"""The PNG bar chart: each mode's time relative to integrity off, per workload, one
panel per backing (synthetic tree, real rootfs)."""
from __future__ import annotations

import sys
from pathlib import Path

from benchlib import ROOTFS, TARGET_TITLES, TREE
from benchlib.modes import MODES, OVERLAY
from benchlib.results import cell_summary
from benchlib.run import Bench


def plot(bench: Bench, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"bench: no plot ({e})", file=sys.stderr)
        return False
    modes = [m for m in bench.modes if m.name != OVERLAY]
    groups = [(t, bench.workloads_of(t)) for t in (TREE, ROOTFS) if bench.workloads_of(t)]
    if not modes or not groups:
        return False
    # a cold mode and its warm twin: one hue, dark and light
    bases = list(dict.fromkeys(m.name.removesuffix("-warm") for m in MODES + bench.modes
                               if not m.native))
    colors = {m.name: "0.55" if m.native else plt.cm.tab20(
        (2 * bases.index(m.name.removesuffix("-warm")) + m.name.endswith("-warm")) % 20)
        for m in bench.modes}
    nmax = max(len(wls) for _, wls in groups)
    fig, axes = plt.subplots(len(groups), 1, squeeze=False, figsize=(
        min(16.0, max(6.0, 2 + nmax * (0.3 * len(modes) + 0.5))), 4.6 * len(groups)))
    for row, (target, wls) in enumerate(groups):
        ax = axes[row][0]
        width = 0.8 / len(modes)
        ratios = [r for w in wls for m in modes
                  if (r := cell_summary(bench.results, w.key, m.name)["ratio_overlay"])]
        log = bool(ratios) and max(ratios) / min(ratios) > 20   # native's 0.05 and 10x
        for i, m in enumerate(modes):
            xs, ys = [], []
            for j, w in enumerate(wls):
                r = cell_summary(bench.results, w.key, m.name)["ratio_overlay"]
                x = j - 0.4 + width * (i + 0.5)
                if r is None:
                    ax.text(x, 1.0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
                    continue
                xs.append(x)
                ys.append(r)
            bars = ax.bar(xs, ys, width, label=m.name, color=colors[m.name])
            for b_, y in zip(bars, ys):
                ax.text(b_.get_x() + b_.get_width() / 2, y,
                        f"{y:.0f}" if y >= 10 else f"{y:.1f}" if y >= 0.95 else f"{y:.2f}",
                        ha="center", va="bottom", fontsize=6,
                        rotation=90 if len(modes) > 4 else 0)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(wls)), [w.key for w in wls])
        ax.set_ylabel("time / integrity off (lower is better" + (", log)" if log else ")"))
        ax.set_title(TARGET_TITLES[target], fontsize=10)
        ax.legend(fontsize=7, ncol=3 if len(modes) > 5 else 1)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(min(ratios) / 2, max(ratios) * 3)
        else:
            ax.set_ylim(bottom=0, top=max(ratios or [1]) * 1.15)
    fig.suptitle("imafs: time relative to the mount with integrity off (--no-integrity = 1), "
                 f"median of {bench.args.reps}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

