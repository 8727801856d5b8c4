"""What a benchmark's timings mean: per-run medians, per-round ratios with their spread, and
the table the lead reads. Pure Python (no torch), so every number here is tested on CPU.

Columns, per run (all medians over the rounds' medians; a round's median is over its timed
steps):

* ``step ms``: wall-clock time of one training step (forward with labels, backward, optimizer
  step), from a point where the GPU is idle (synchronised) to the synchronise after the step.
* ``tok/s``: tokens per step / step time.
* ``TFLOP/s``, ``MFU``: model FLOPs (``train.flops``: 3 x forward, causal attention halved)
  per token x tok/s, and that over the card's dense BF16 peak.
* ``host ms``: CPU time to *issue* the step: wall-clock from the step's start until the last
  call of the step returns, before the final synchronise. Time the host spends blocked in a
  synchronisation inside the step (e.g. MoE token counts copied to the host) is included.
* ``span ms``: CUDA events recorded at the start and the end of the step (on the current
  stream): first to last GPU work of the step, idle gaps included (the GPU waiting for the
  host). ``span ~ step`` and ``host ~ step`` means the step is host-bound.
* ``busy ms``: the union of GPU kernel/memcpy/memset intervals of one step, from a short
  torch.profiler pass after timing (no idle gaps): what the step costs the GPU alone.
* ``launches``: kernel launches the host issued per step (same profiler pass).
* ``peak GiB``: this model's own peak: its resident parameters and optimizer state plus the
  step's working memory (gradients, activations), excluding other models held in the process.

A target counts as met only outside the spread: the ratio of two runs is taken per round
(alternating runs share the machine's drift), and ``verdict`` says "met" only if every
round's ratio clears the target, "not met" if none does, otherwise "inside the spread".
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: the main runs, in the order they are built and timed (see ``train.bench``).
MAIN_RUNS = ("native", "plugin", "native_tuned", "plugin_tuned")


def median(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


@dataclass
class RoundTiming:
    """One run's timed steps of one round (milliseconds per step)."""

    step_ms: list[float]
    host_ms: list[float]
    span_ms: list[float]

    def medians(self) -> dict[str, float]:
        return {"step_ms": median(self.step_ms), "host_ms": median(self.host_ms),
                "span_ms": median(self.span_ms)}


@dataclass
class RunResult:
    """Everything measured for one run (a model under one setting) over all rounds."""

    name: str
    tokens_per_step: int
    flops_per_token: float
    rounds: list[RoundTiming] = field(default_factory=list)
    peak_bytes: int = 0
    busy_ms: float | None = None
    launches_per_step: float | None = None
    #: top host ops by self CPU time per step (profiler pass): op, self_ms, calls
    host_ops: list[dict] | None = None
    #: host issue time per step: forward (and per family), backward, optimizer (ms)
    host_split: dict | None = None
    error: str | None = None

    def round_tokens_per_s(self) -> list[float]:
        """tok/s of each round (tokens per step / that round's median step)."""
        return [self.tokens_per_step / (r.medians()["step_ms"] / 1e3) for r in self.rounds]

    def summary(self, peak_tflops: float | None) -> dict:
        """The table's row: medians over rounds plus the per-round tok/s."""
        if not self.rounds:
            return {"name": self.name, "error": self.error or "no timed rounds"}
        per_round = [r.medians() for r in self.rounds]
        step_ms = median(m["step_ms"] for m in per_round)
        tok_s = self.tokens_per_step / (step_ms / 1e3)
        tflops = self.flops_per_token * tok_s / 1e12
        return {
            "name": self.name,
            "step_ms": step_ms,
            "tokens_per_s": tok_s,
            "tflops": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None,
            "host_ms": median(m["host_ms"] for m in per_round),
            "span_ms": median(m["span_ms"] for m in per_round),
            "busy_ms": self.busy_ms,
            "launches_per_step": self.launches_per_step,
            "host_ops": self.host_ops,
            "host_split": self.host_split,
            "peak_gib": self.peak_bytes / 2**30,
            "tokens_per_step": self.tokens_per_step,
            "flops_per_token": self.flops_per_token,
            "round_tokens_per_s": self.round_tokens_per_s(),
            "round_step_ms": [m["step_ms"] for m in per_round],
            "error": self.error,
        }


@dataclass(frozen=True)
class Spread:
    """Per-round ratios of two runs (numerator / denominator tok/s) and their summary."""

    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return median(self.ratios)

    @property
    def low(self) -> float:
        return min(self.ratios)

    @property
    def high(self) -> float:
        return max(self.ratios)

    def to_json(self) -> dict:
        return {"ratios": list(self.ratios), "median": self.median, "min": self.low,
                "max": self.high}


def ratio_spread(numerator: Sequence[float], denominator: Sequence[float]) -> Spread:
    """Ratios round by round (the two runs alternated in the same rounds)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"ratios need the same, non-zero number of rounds; got "
                         f"{len(numerator)} and {len(denominator)}")
    return Spread(tuple(n / d for n, d in zip(numerator, denominator, strict=True)))


def verdict(spread: Spread, target: float, at_most: bool = False) -> str:
    """'met' only if the whole spread clears ``target`` (is at least it, or with
    ``at_most`` at most it); 'not met' if none of it does; else 'inside the spread'."""
    low, high = (spread.low, spread.high) if not at_most else (-spread.high, -spread.low)
    target = -target if at_most else target
    if low >= target:
        return "met"
    if high < target:
        return "not met"
    return "inside the spread"


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


COLUMNS = ("run", "step ms", "tok/s", "TFLOP/s", "MFU", "host ms", "span ms", "busy ms",
           "peak GiB", "launches")


def format_table(rows: Sequence[dict]) -> str:
    """The runs' summaries as an aligned text table (failed runs show their error)."""
    widths = (22, 9, 9, 8, 7, 8, 8, 8, 9, 9)
    head = "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                   for i, (c, w) in enumerate(zip(COLUMNS, widths, strict=True)))
    lines = [head, "-" * len(head)]
    for row in rows:
        if "step_ms" not in row:
            lines.append(f"{row['name']:<22}FAILED: {row.get('error')}")
            continue
        mfu = None if row["mfu"] is None else 100 * row["mfu"]
        cells = (row["name"], _fmt(row["step_ms"], ".1f"), _fmt(row["tokens_per_s"], ".0f"),
                 _fmt(row["tflops"], ".1f"), _fmt(mfu, ".1f") + ("%" if mfu is not None else ""),
                 _fmt(row["host_ms"], ".1f"), _fmt(row["span_ms"], ".1f"),
                 _fmt(row["busy_ms"], ".1f"), _fmt(row["peak_gib"], ".2f"),
                 _fmt(row["launches_per_step"], ".0f"))
        lines.append("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
    return "\n".join(lines)


def format_ratio(label: str, spread: Spread, target: float | None = None,
                 at_most: bool = False) -> str:
    """One line: per-round ratios, median and [min, max], and the verdict against a target."""
    rounds = " ".join(f"{r:.3f}" for r in spread.ratios)
    line = (f"{label:<28} median {spread.median:.3f}  spread [{spread.low:.3f}, "
            f"{spread.high:.3f}]  rounds: {rounds}")
    if target is not None:
        bound = "<=" if at_most else ">="
        line += f"  target {bound} {target:.2f}: {verdict(spread, target, at_most)}"
    return line


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping ``(start, end)`` intervals (GPU busy
    time from a profile's kernel intervals: concurrent kernels are counted once)."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def format_families(families: dict[str, list[dict]], depth: int) -> str:
    """Per-family rows: median step ms of a ``depth``-layer model of one letter (embedding
    and logits included, the same in both), native and plugin (and the plugin with the
    bench's ``--tuned-set`` recipe settings, where given), and the per-round tok/s ratios
    over native (median [min, max])."""
    tuned = any(row["name"].endswith("plugin_tuned") for rows in families.values()
                for row in rows)
    head = f"{'family':<8}{'native ms':>10}{'plugin ms':>10}"
    head += f"{'tuned ms':>10}" if tuned else ""
    lines = [head + "  plugin/native" + ("; plugin_tuned/native" if tuned else "")
             + " tok/s (median [min, max] over rounds)"]
    for letter, rows in families.items():
        by = {row["name"].split()[-1]: row for row in rows}
        native = by.get("native", {})
        names = ("plugin", "plugin_tuned") if tuned else ("plugin",)
        ratios = []
        for name in names:
            n_rounds = native.get("round_tokens_per_s")
            p_rounds = by.get(name, {}).get("round_tokens_per_s")
            ratio = "-"
            if n_rounds and p_rounds and len(n_rounds) == len(p_rounds):
                s = ratio_spread(p_rounds, n_rounds)
                ratio = f"{s.median:.3f} [{s.low:.3f}, {s.high:.3f}]"
            ratios.append(ratio)
        errors = "; ".join(r["error"] for r in rows if r.get("error"))
        cells = "".join(f"{_fmt(by.get(n, {}).get('step_ms'), '.1f'):>10}"
                        for n in ("native", *names))
        lines.append(f"{letter:<8}{cells}  {'; '.join(ratios)}"
                     + (f"  errors: {errors}" if errors else ""))
    lines.append(f"(each row: a {depth}-layer model of that letter)")
    return "\n".join(lines)


def format_host_split(rows: Sequence[dict]) -> str:
    """Where each run's host issue time goes (ms per step): forward with the loss, per block
    family inside it, backward, optimizer; then each run's top host ops by self CPU time."""
    rows = [r for r in rows if r.get("host_split")]
    if not rows:
        return ""
    letters = sorted({x for r in rows for x in r["host_split"]["forward_by_family"]})
    head = (f"{'host ms/step':<22}{'forward':>9}" + "".join(f"{'  ' + x:>7}" for x in letters)
            + f"{'backward':>10}{'optim':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        split = r["host_split"]
        lines.append(f"{r['name']:<22}{split['forward']:>9.1f}"
                     + "".join(f"{split['forward_by_family'].get(x, 0.0):>7.1f}"
                               for x in letters)
                     + f"{split['backward']:>10.1f}{split['optimizer']:>8.1f}")
    lines.append("(forward per family: wall time inside that family's layers; the forward "
                 "also holds embedding, final norm and loss)")
    for r in rows:
        if r.get("host_ops"):
            ops = ", ".join(f"{o['op']} {o['self_ms']:.1f} ({o['calls']:.0f}x)"
                            for o in r["host_ops"][:8])
            lines.append(f"top host ops, {r['name']} (self CPU ms/step, calls): {ops}")
    return "\n".join(lines)
