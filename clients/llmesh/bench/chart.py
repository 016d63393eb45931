"""The benchmark's chart: output tok/s, TTFT p50 and TPOT p50 against concurrency, one line per
mode (matplotlib, ``pip install 'llmesh[plot]'``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmesh.bench.settings import MODES


def write_chart(report: Mapping[str, Any], path: Path) -> bool:
    """Output tok/s, TTFT p50 and TPOT p50 against concurrency, one line per mode.

    Args:
        report: the benchmark's report (``meta`` and ``modes``).
        path: where the PNG goes.

    Returns:
        False, writing nothing, when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogFormatter
    except ImportError:
        return False
    panels = (
        ("output_tok_s", "output tokens/s", False),
        ("ttft_p50_ms", "TTFT p50 (ms)", True),
        ("tpot_p50_ms", "TPOT p50 (ms)", True),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    for ax, (key, title, log_y) in zip(axes, panels, strict=True):
        for mode, label in MODES.items():
            levels = report["modes"].get(mode, {}).get("levels", {})
            points = [(int(c), s[key]) for c, s in levels.items() if s.get(key) is not None]
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
            # Plain numbers (20, not 2x10^1); minor ticks labelled only on short ranges.
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_formatter(
                LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4))
            )
        ax.set_xticks(
            report["meta"]["concurrency"], [str(c) for c in report["meta"]["concurrency"]]
        )
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"llmesh bench: {report['meta']['model']}; {report['meta']['load']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
