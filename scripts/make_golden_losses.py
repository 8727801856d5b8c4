"""Golden fp32 CPU loss curves of ``tiny``, on the frozen test corpus.

Trains two runs with the project's own CPU path (:func:`megacpp_mcore.train.cpu_loop.train_on_cpu`,
hooks from :func:`megacpp_mcore.features.build_training_hooks`, one receipt interval per step)
on the frozen corpus under ``tests/assets/corpus`` (prepared with
:func:`megacpp_mcore.train.data.prepare_dataset`, read as ``data.source: path``), and writes
``tests/assets/golden_losses.json``:

- ``tiny``: the plain recipe (small batches, fp32);
- ``tiny_tools``: the same with FIRE, DASH and ReDo scheduled inside the run and STP on.

Per step it keeps the lm loss and every auxiliary value in the receipt (MoE load balancing,
STP loss and weight), and per intervention the event's step, kind and ``touched`` count. The
file also records the versions it was made with, the command, the corpus hash and the
tolerance ``tests/test_golden_losses.py`` compares with. Regenerate (after a change that is
meant to move the curves, say why in the commit):

    .venv/bin/python scripts/make_golden_losses.py

``--measure`` then reruns both recipes (again, at 1 and at 2 torch threads, and with the
weights nudged by one float32 ulp), prints the largest drift from the golden curves and
records it in the file's ``tolerance.measured`` (the curves stay): the numbers the tolerance
was chosen from (see ``TOLERANCE``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any folder
    sys.path.insert(0, str(ROOT))

CORPUS = ROOT / "tests" / "assets" / "corpus"
GOLDEN = ROOT / "tests" / "assets" / "golden_losses.json"
COMMAND = ".venv/bin/python scripts/make_golden_losses.py"
STEPS = 24

#: the settings both runs share: short sequences and small batches (two micro-batches a step)
#: so the 2 x 24 steps take about half a minute on 2 cores; fp32 is tiny's own precision; one
#: receipt interval per step.
COMMON = (
    "model.seq_length=32", "training.micro_batch_size=2", "training.global_batch_size=4",
    f"training.train_iters={STEPS}", "training.log_interval=1", "training.lr_warmup_iters=3",
    "precision.params_dtype=fp32",
)
#: each run's own settings. tiny_tools: FIRE at 6 and 18 (lr re-warm-up over 3 steps), DASH
#: at 6, 12, 18, 24, ReDo at 8, 16, 24 (tau 0.9, so some unit is dormant at every check);
#: STP logged from step 1 and trained on from step 12.
RUNS: dict[str, tuple[str, ...]] = {
    "tiny": (),
    "tiny_tools": (
        "plasticity.fire.steps=[6,18]", "plasticity.fire.rewarmup_iters=3",
        "plasticity.dash.every=6", "plasticity.dash.start=6",
        "plasticity.redo.every=8", "plasticity.redo.start=8", "plasticity.redo.tau=0.9",
        "stp.enabled=true", "stp.start_step=12", "stp.triples=16",
    ),
}

#: How close a rerun must stay to the golden curves (``rtol`` relative to the golden value,
#: plus ``atol``). Chosen from ``--measure`` on the machine that made the file: reruns are
#: bit-identical, 1 vs 2 threads and a one-ulp nudge of the weights drift at most 3.2e-7
#: relative, so 1e-4 is ~300x that (other CPUs' kernels, other library versions) and still
#: 100x below what a broken feature moves. The JSON and the test's docstring say the same.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def prepare_frozen_corpus(folder: Path | str) -> Path:
    """The frozen corpus as a Megatron indexed dataset ``folder/frozen`` (.bin/.idx/.json),
    written by the project's own ``prepare_dataset`` (what ``megacpp data prepare`` runs)."""
    from megacpp_mcore.train.data import collect_files, prepare_dataset

    prefix = Path(folder) / "frozen"
    prepare_dataset(collect_files([CORPUS]), prefix)
    return prefix


def corpus_hash() -> str:
    """sha256 of the frozen corpus (names and bytes), as the dataset manifest records it."""
    from megacpp_mcore.train.data import collect_files, content_hash

    return content_hash(collect_files([CORPUS]))


def recipe_overrides(name: str, prefix: Path | str) -> list[str]:
    """The ``--set`` overrides of run ``name`` on the prepared frozen corpus ``prefix``."""
    return [*COMMON, "data.source=path", f"data.paths=[{prefix}]", *RUNS[name]]


def _nudge_hook():
    """A training hook that scales every weight by (1 + 2**-23) at install: a one-ulp float32
    perturbation, to see how far rounding differences carry over the run (``--measure``)."""
    import torch

    from megacpp_mcore.train.hooks import TrainingHook

    class Nudge(TrainingHook):
        name = "nudge"

        def install(self, model_chunks, context) -> None:
            with torch.no_grad():
                for chunk in model_chunks:
                    for param in chunk.parameters():
                        param.mul_(1.0 + 2.0**-23)

    return Nudge()


def train(name: str, prefix: Path | str, workdir: Path | str, *, nudge: bool = False) -> dict:
    """Run ``name`` on the CPU path; its per-step curves and events from the receipt."""
    from megacpp_mcore.features import build_training_hooks
    from megacpp_mcore.settings.recipe import load_recipe
    from megacpp_mcore.train.cpu_loop import train_on_cpu
    from megacpp_mcore.train.hooks import HookList

    recipe = load_recipe("tiny", recipe_overrides(name, prefix))
    hooks = build_training_hooks(recipe)
    if nudge:
        hooks = HookList([_nudge_hook(), *hooks])
    receipt = train_on_cpu(recipe, receipt_path=Path(workdir) / f"{name}.json", print_fn=None,
                           hooks=hooks)
    return curves(receipt.data, name)


def curves(receipt: dict, name: str) -> dict:
    """Run ``name``'s per-step curves and events from its receipt's data (one interval a
    step): what the golden file keeps of a run."""
    intervals = receipt["intervals"]
    if [iv["step"] for iv in intervals] != list(range(1, STEPS + 1)):
        raise RuntimeError(f"{name}: expected one receipt interval per step 1..{STEPS}")
    aux_keys = sorted({k for iv in intervals for k in iv.get("aux_losses", {})})
    return {
        "settings": list(RUNS[name]),
        "loss": [iv["loss"] for iv in intervals],
        "aux_losses": {k: [iv["aux_losses"].get(k) for iv in intervals] for k in aux_keys},
        "events": [{"step": e["step"], "kind": e["kind"], "touched": e["touched"]}
                   for e in receipt.get("events", [])],
    }


def train_all(*, threads: int | None = None, nudge: bool = False) -> dict[str, dict]:
    """Both runs, on a freshly prepared copy of the frozen corpus."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="golden.") as tmp:
        prefix = prepare_frozen_corpus(tmp)
        return {name: train(name, prefix, tmp, nudge=nudge) for name in RUNS}


def _series(run: dict) -> dict[str, list]:
    out = {"loss": run["loss"]}
    out.update({f"aux_losses.{k}": v for k, v in run["aux_losses"].items()})
    return out


def drift(golden: dict[str, dict], fresh: dict[str, dict]) -> tuple[float, float]:
    """The largest absolute and relative difference over every run, series and step."""
    abs_max = rel_max = 0.0
    for name, run in golden.items():
        ours = _series(fresh[name])
        for key, values in _series(run).items():
            for g, f in zip(values, ours.get(key, []), strict=False):
                if g is None or f is None:
                    continue
                abs_max = max(abs_max, abs(f - g))
                rel_max = max(rel_max, abs(f - g) / max(abs(g), 1e-12))
    return abs_max, rel_max


def compare(golden: dict[str, dict], fresh: dict[str, dict], rtol: float,
            atol: float) -> list[str]:
    """Every difference from the golden runs beyond ``|fresh - golden| <= atol + rtol *
    |golden|``, plus any change of the series, their length or the events (exact)."""
    problems: list[str] = []
    for name, run in golden.items():
        if name not in fresh:
            problems.append(f"{name}: run missing")
            continue
        want, got = _series(run), _series(fresh[name])
        if want.keys() != got.keys():
            problems.append(f"{name}: series {sorted(got)} != golden {sorted(want)}")
        for key in want.keys() & got.keys():
            if len(want[key]) != len(got[key]):
                problems.append(f"{name}.{key}: {len(got[key])} steps, golden {len(want[key])}")
                continue
            for step, (g, f) in enumerate(zip(want[key], got[key], strict=True), start=1):
                if (g is None) != (f is None) or (
                        g is not None and abs(f - g) > atol + rtol * abs(g)):
                    problems.append(f"{name}.{key} step {step}: {f!r}, golden {g!r}")
        if run["events"] != fresh[name]["events"]:
            problems.append(f"{name}: events {fresh[name]['events']} != golden {run['events']}")
    return problems


def versions() -> dict[str, str]:
    from importlib.metadata import version

    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron-core": version("megatron-core"),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
    }


#: why the tolerance is what it is; written into the JSON beside the measured drift.
TOLERANCE_NOTE = (
    "rtol/atol bound |rerun - golden| <= atol + rtol * |golden| for every per-step value "
    "(lm loss, MoE load balancing loss, STP loss and weight); events (step, kind, touched) "
    "must match exactly. 'measured' holds the drift --measure saw on the machine that made "
    "this file: reruns, 1 vs 2 torch threads, and every weight nudged by one float32 ulp "
    "(a stand-in for the rounding differences of another CPU's BLAS or another library "
    "version). The tolerance is set well above the largest of them, and well below what a "
    "broken feature moves: a different batch, a tool that no longer fires or acts "
    "differently changes the curve by 1e-2 or more within a few steps."
)


def tolerance_block(measured: dict | None) -> dict:
    """The JSON's ``tolerance``: the bounds, why, the drift measured and their ratio."""
    block = {**TOLERANCE, "note": TOLERANCE_NOTE, "measured": measured}
    if measured:
        worst = max(m["max_rel"] for m in measured["drift"].values())
        block["margin"] = (f"rtol {TOLERANCE['rtol']:g} is "
                           + (f"{TOLERANCE['rtol'] / worst:.0f}x" if worst else "far above")
                           + f" the largest relative drift measured ({worst:.1e})")
    return block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true",
                        help="rerun at 1 and 2 threads and nudged by one ulp; print the drift "
                        "from the golden curves and record it in the file (curves unchanged)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's own)")
    args = parser.parse_args(argv)

    if args.measure:
        data = json.loads(GOLDEN.read_text())
        measured = {}
        for label, kwargs in (("rerun", {}), ("1 thread", {"threads": 1}),
                              ("2 threads", {"threads": 2}),
                              ("one-ulp nudge", {"nudge": True})):
            fresh = train_all(**kwargs)
            abs_max, rel_max = drift(data["runs"], fresh)
            same_events = all(fresh[n]["events"] == r["events"] for n, r in data["runs"].items())
            measured[label] = {"max_abs": abs_max, "max_rel": rel_max,
                               "events_equal": same_events}
            print(f"{label:14s} max abs drift {abs_max:.3e}  max rel drift {rel_max:.3e}  "
                  f"events equal: {same_events}", flush=True)
        data["tolerance"] = tolerance_block({"command": COMMAND + " --measure",
                                             "versions": versions(), "drift": measured})
        GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
        return 0

    import time

    started = time.perf_counter()
    runs = train_all(threads=args.threads)
    seconds = time.perf_counter() - started
    previous = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    data = {
        "about": "Golden fp32 CPU loss curves of tiny on the frozen corpus tests/assets/corpus; "
                 "tests/test_golden_losses.py reruns them. Regenerate: " + COMMAND,
        "command": COMMAND + (f" --threads {args.threads}" if args.threads else ""),
        "versions": versions(),
        "corpus": {"path": CORPUS.relative_to(ROOT).as_posix(), "content_hash": corpus_hash()},
        "recipe": "tiny",
        "common_settings": list(COMMON),
        "steps": STEPS,
        "seconds": round(seconds, 1),
        # the drift last measured (rerun --measure after a regeneration)
        "tolerance": tolerance_block(previous.get("tolerance", {}).get("measured")),
        "runs": runs,
    }
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {GOLDEN.relative_to(ROOT)} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
