"""The PNG bar chart: each mode's time relative to integrity off, per workload, one
panel per backing (synthetic tree, real rootfs); when passthrough-c ran, a second
panel per backing relative to it (the C limit). A pinned mode has hatched bars."""
from __future__ import annotations

import sys
from pathlib import Path

from benchlib import ROOTFS, TARGET_TITLES, TREE
from benchlib.modes import MODES, OVERLAY, PASSTHROUGH_C, PIN_SUFFIX, reference
from benchlib.results import cell_summary
from benchlib.run import Bench

# (ratio key, reference mode, what the axis says it is relative to)
PANELS = (("ratio_overlay", OVERLAY, "integrity off"),
          ("ratio_passthrough_c", PASSTHROUGH_C, "passthrough-c"))


def _base(name: str) -> str:
    return name.removesuffix(PIN_SUFFIX).removesuffix("-warm")


def plot(bench: Bench, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"bench: no plot ({e})", file=sys.stderr)
        return False
    groups = [(t, bench.workloads_of(t)) for t in (TREE, ROOTFS) if bench.workloads_of(t)]
    # relative to integrity off always (as n/a where it did not run), to the C limit
    # when it ran
    panels = [(key, kind, label, target, wls) for key, kind, label in PANELS
              if kind == OVERLAY or any(m.name == reference(kind, m.name) for m in bench.modes)
              for target, wls in groups]
    if not groups or all(m.name == reference(OVERLAY, m.name) for m in bench.modes):
        return False
    # a cold mode and its warm twin: one hue, dark and light
    bases = list(dict.fromkeys(_base(m.name) for m in MODES + bench.modes if not m.native))
    colors = {m.name: "0.55" if m.native else plt.cm.tab20(
        (2 * bases.index(_base(m.name)) + m.name.removesuffix(PIN_SUFFIX).endswith("-warm"))
        % 20) for m in bench.modes}
    nmax = max(len(wls) for _, wls in groups)
    nmodes = len(bench.modes) - 1
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(
        min(16.0, max(6.0, 2 + nmax * (0.3 * nmodes + 0.5))), 4.6 * len(panels)))
    for row, (key, kind, label, target, wls) in enumerate(panels):
        modes = [m for m in bench.modes if m.name != reference(kind, m.name)]
        _panel(axes[row][0], bench, modes, wls, key, colors)
        axes[row][0].set_ylabel(f"time / {label} (lower is better"
                                + (", log)" if axes[row][0].get_yscale() == "log" else ")"))
        axes[row][0].set_title(f"{TARGET_TITLES[target]}: relative to {label}", fontsize=10)
    fig.suptitle("imafs: time relative to the mount with integrity off (--no-integrity = 1)"
                 + (" and to libfuse's C passthrough_ll" if len(panels) > len(groups) else "")
                 + f", median of {bench.args.reps}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))   # room for the suptitle
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return True


def _panel(ax, bench: Bench, modes, wls, key: str, colors: dict) -> None:
    width = 0.8 / len(modes)
    ratios = [r for w in wls for m in modes
              if (r := cell_summary(bench.results, w.key, m.name)[key])]
    log = bool(ratios) and max(ratios) / min(ratios) > 20   # native's 0.05 and 10x
    for i, m in enumerate(modes):
        xs, ys = [], []
        for j, w in enumerate(wls):
            r = cell_summary(bench.results, w.key, m.name)[key]
            x = j - 0.4 + width * (i + 0.5)
            if r is None:
                ax.text(x, 1.0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
                continue
            xs.append(x)
            ys.append(r)
        bars = ax.bar(xs, ys, width, label=m.name, color=colors[m.name],
                      hatch="//" if m.pinned else None)
        for b_, y in zip(bars, ys):
            ax.text(b_.get_x() + b_.get_width() / 2, y,
                    f"{y:.0f}" if y >= 10 else f"{y:.1f}" if y >= 0.95 else f"{y:.2f}",
                    ha="center", va="bottom", fontsize=6,
                    rotation=90 if len(modes) > 4 else 0)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(wls)), [w.key for w in wls])
    ax.legend(fontsize=7, ncol=3 if len(modes) > 5 else 1)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(ratios) / 2, max(ratios) * 3)
    else:
        ax.set_ylim(bottom=0, top=max(ratios or [1]) * 1.15)
