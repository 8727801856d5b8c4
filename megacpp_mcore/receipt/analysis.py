"""Reading receipts for people: the summary, the side-by-side comparison and the plot."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megacpp_mcore.errors import ReceiptError
from megacpp_mcore.jsonio import number
from megacpp_mcore.receipt.writer import Receipt


def _fmt(value: Any, spec: str = ".4g") -> str:
    v = number(value)
    if v is None:
        return "-" if value is None else str(value)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return format(v, spec)


def _fmt_bytes(value: Any) -> str:
    v = number(value)
    if v is None:
        return "-"
    return f"{v / 2**30:.2f} GiB"


def format_receipt(receipt: Receipt) -> str:
    """A readable summary: run, recipe, pattern, backends, versions, last interval, goodput."""
    d = receipt.data
    run = d["run"]
    lines = [
        f"receipt  {receipt.path}",
        f"run      {run.get('id')}  status {run.get('status')}",
        f"         started {run.get('start_time')}  ended {run.get('end_time') or '-'}",
    ]
    if run.get("command_line"):
        lines.append("command  " + " ".join(map(str, run["command_line"])))
    recipe = d.get("recipe") or {}
    rhash = recipe.get("hash") or ""
    lines.append(f"recipe   {recipe.get('name') or '-'}  hash {rhash[:16] or '-'}")
    pattern = d.get("pattern")
    if pattern:
        counts: dict[str, int] = {}
        for role in pattern.get("roles", []):
            counts[role["letter"]] = counts.get(role["letter"], 0) + 1
        count_text = ", ".join(f"{n} {letter}" for letter, n in counts.items())
        lines.append(
            f"pattern  {pattern.get('pattern')}  ({pattern.get('depth')} layers: {count_text})"
        )
    if d["backends"]:
        lines.append(
            "backends "
            + "; ".join(
                f"{family}: asked {b.get('requested', '-')}, ran {b.get('observed', '-')}"
                if isinstance(b, dict)
                else f"{family}: {b}"
                for family, b in d["backends"].items()
            )
        )
    if d["parallel"]:
        lines.append("parallel " + ", ".join(f"{k}={v}" for k, v in d["parallel"].items()))
    versions = d["versions"]
    if versions:
        shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v not in (None, 0))
        missing = [k for k, v in versions.items() if v is None]
        lines.append(f"versions {shown}")
        if missing:
            lines.append(f"         absent: {', '.join(missing)}")
    for feat in d["features"]:
        lines.append(
            f"feature  {feat.get('name')} from step {feat.get('from_step')} "
            f"{json.dumps(feat.get('settings', {}), sort_keys=True)}"
        )
    lines.append(f"intervals {len(receipt.intervals)} ({sum(receipt.warmup_flags())} warm-up)")
    last = receipt.last_interval()
    if last:
        aux = ", ".join(f"{k} {_fmt(v)}" for k, v in (last.get("aux_losses") or {}).items())
        lines += [
            f"last     step {last['step']}: loss {_fmt(last.get('loss'))}"
            + (f" (aux: {aux})" if aux else "")
            + f", lr {_fmt(last.get('lr'), '.3g')}",
            f"         {_fmt(last.get('tokens_per_s'), ',.0f')} tokens/s, "
            f"{_fmt(last.get('tflops_per_gpu'), '.1f')} TFLOP/s/GPU, "
            f"MFU {_fmt_pct(last.get('mfu'))}, peak memory "
            f"{_fmt_bytes(last.get('peak_memory_bytes'))}",
        ]
        good = last.get("goodput")
        if good:
            total = number(good.get("total_s")) or 0.0
            parts = ", ".join(f"{k} {_fmt(v, '.1f')}s" for k, v in good.get("buckets", {}).items())
            lines.append(
                f"goodput  {_fmt_pct(good.get('fraction'))} of {total:.1f}s wall ({parts})"
            )
    return "\n".join(lines)


def _fmt_pct(value: Any) -> str:
    v = number(value)
    return "-" if v is None else f"{100 * v:.1f}%"


# --------------------------------------------------------------------------- compare

COMPARE_METRICS = ("loss", "tokens_per_s", "tflops_per_gpu", "mfu")


def compare_receipts(a: Receipt, b: Receipt) -> dict[str, Any]:
    """Matching steps of two runs over the window where both are past warm-up.

    The window starts at the later of the two runs' first non-warm-up steps; inside it,
    only steps both runs logged and neither flagged as warm-up are compared. Returns
    ``{window: [start, end] or None, rows: [{step, a: {...}, b: {...}}], means: {metric:
    (a, b)}}``.
    """
    post_a = {iv["step"]: iv for iv in a.post_warmup()}
    post_b = {iv["step"]: iv for iv in b.post_warmup()}
    if not post_a or not post_b:
        return {"window": None, "rows": [], "means": {}}
    start = max(min(post_a), min(post_b))
    steps = sorted(s for s in set(post_a) & set(post_b) if s >= start)
    rows = [
        {
            "step": s,
            "a": {m: number(post_a[s].get(m)) for m in COMPARE_METRICS},
            "b": {m: number(post_b[s].get(m)) for m in COMPARE_METRICS},
        }
        for s in steps
    ]
    means: dict[str, tuple[float | None, float | None]] = {}
    for m in COMPARE_METRICS:
        pair = []
        for side in ("a", "b"):
            vals = [r[side][m] for r in rows if r[side][m] is not None]
            pair.append(sum(vals) / len(vals) if vals else None)
        means[m] = (pair[0], pair[1])
    return {"window": [steps[0], steps[-1]] if steps else None, "rows": rows, "means": means}


def format_comparison(a: Receipt, b: Receipt) -> str:
    """The comparison as a side-by-side table (A | B | B/A per metric)."""
    result = compare_receipts(a, b)
    lines = [f"A  {a.label}  ({a.path})", f"B  {b.label}  ({b.path})"]
    for name, get in (
        ("recipe", lambda r: (r.data.get("recipe") or {}).get("name")),
        ("pattern", lambda r: (r.data.get("pattern") or {}).get("pattern")),
        ("status", lambda r: r.data["run"].get("status")),
    ):
        va, vb = get(a), get(b)
        lines.append(f"{name:<8} A {va}  B {vb}" if va != vb else f"{name:<8} {va} (both)")
    if result["window"] is None:
        lines.append("no common steps past warm-up: nothing to compare")
        return "\n".join(lines)
    lo, hi = result["window"]
    lines.append(f"window   steps {lo}..{hi} past warm-up in both ({len(result['rows'])} steps)")
    header = (
        f"{'step':>7} | {'loss A':>9} {'loss B':>9} {'B-A':>8} | "
        f"{'tok/s A':>10} {'tok/s B':>10} {'B/A':>6} | {'MFU A':>6} {'MFU B':>6}"
    )
    lines += [header, "-" * len(header)]

    def row(label: str, ma: dict, mb: dict) -> str:
        la, lb = ma.get("loss"), mb.get("loss")
        ta, tb = ma.get("tokens_per_s"), mb.get("tokens_per_s")
        delta = _fmt(lb - la, "+.4f") if la is not None and lb is not None else "-"
        ratio = _fmt(tb / ta, ".3f") if ta and tb is not None else "-"
        return (
            f"{label:>7} | {_fmt(la, '.4f'):>9} {_fmt(lb, '.4f'):>9} {delta:>8} | "
            f"{_fmt(ta, ',.0f'):>10} {_fmt(tb, ',.0f'):>10} {ratio:>6} | "
            f"{_fmt_pct(ma.get('mfu')):>6} {_fmt_pct(mb.get('mfu')):>6}"
        )

    for r in result["rows"]:
        lines.append(row(str(r["step"]), r["a"], r["b"]))
    lines.append("-" * len(header))
    means = result["means"]
    lines.append(
        row("mean", {m: v[0] for m, v in means.items()}, {m: v[1] for m, v in means.items()})
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot_receipts(receipts: Sequence[Receipt], output: Path | str) -> Path:
    """Loss, each aux loss and tokens/s against step, one line per receipt, to a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot, no display). Warm-up intervals are
    drawn too (hollow markers), so start-up cost stays visible.
    """
    if not receipts:
        raise ReceiptError("plot needs at least one receipt")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is a dev dependency
        raise ReceiptError("plotting needs matplotlib: pip install matplotlib") from err

    aux_names: list[str] = []
    for r in receipts:
        for iv in r.intervals:
            for name in iv.get("aux_losses") or {}:
                if name not in aux_names:
                    aux_names.append(name)
    panels = [("loss", "loss", None)]
    panels += [(f"aux: {n}", "aux_losses", n) for n in aux_names]
    panels.append(("tokens/s", "tokens_per_s", None))

    fig = Figure(figsize=(8, 2.6 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, key, sub) in zip(axes, panels, strict=True):
        for r in receipts:
            steps, values, warm = [], [], []
            for iv, is_warm in zip(r.intervals, r.warmup_flags(), strict=True):
                raw = (iv.get(key) or {}).get(sub) if sub else iv.get(key)
                v = number(raw)
                if v is None or not math.isfinite(v):  # nothing to draw for nan/inf
                    continue
                steps.append(iv["step"])
                values.append(v)
                warm.append(is_warm)
            if not steps:
                continue
            (line,) = ax.plot(steps, values, marker="o", markersize=3, label=r.label)
            ws = [s for s, w in zip(steps, warm, strict=True) if w]
            wv = [v for v, w in zip(values, warm, strict=True) if w]
            if ws:
                ax.plot(
                    ws,
                    wv,
                    linestyle="none",
                    marker="o",
                    markersize=6,
                    markerfacecolor="none",
                    color=line.get_color(),
                )
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step")
    output = Path(output)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow on huge values
            fig.tight_layout()
            output.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(output, format="png")
    except OSError as err:
        raise ReceiptError(f"cannot write plot {output}: {err}") from err
    except (ValueError, OverflowError) as err:  # matplotlib cannot lay out the axes
        raise ReceiptError(
            f"cannot plot {', '.join(str(r.path) for r in receipts)}: a value is too large "
            f"to draw (steps or metrics near the float limit, 1e308): {err}") from None
    return output
