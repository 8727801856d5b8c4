"""Run receipts: one JSON file per run, rewritten atomically at every log interval.

A receipt says what ran (recipe, pattern and per-layer roles, backends asked for and
actually used, versions, parallel sizes, the training-time features and from which step)
and how it went (per-interval loss, aux losses, learning rate, throughput, MFU, peak memory
and goodput). Comparisons between runs are made from receipts (``megacpp receipt compare``).

Writing is crash-safe: every write goes to a temporary file in the receipt's folder, is
fsync'ed and then ``os.replace``-d over the receipt, so a killed run always leaves its last
complete receipt (status ``"running"`` with the last interval it logged).

Schema (``schema_version`` 1; ``kind`` is always ``"megacpp-receipt"``)::

    schema_version   int, 1
    kind             "megacpp-receipt"
    run              {id, start_time, end_time, status, command_line: [str], host, pid}
                     start/end time: ISO-8601 UTC; status: "running", "completed",
                     "failed: <reason>", "interrupted" (Ctrl-C) or "terminated" (SIGTERM)
    recipe           {name, hash}       hash: sha256 of the recipe (see content_hash)
    pattern          {pattern, depth, roles: [{number, letter, family}],
                      mtp_roles: [{mtp_part, number, letter, family}]} or null
    backends         {family: {requested, observed}}   as given by the caller
    versions         {python, torch, megatron_core, transformer_engine, mamba_ssm,
                      causal_conv1d, flash_linear_attention, triton, cuda, cudnn,
                      gpu_name, gpu_count, megacpp_mcore}   null where absent
    parallel         {tensor, pipeline, expert, context, data, ...}   as given
    features         [{name, from_step, settings}]   training-time features (plasticity, STP)
    events           [{step, kind, touched, seconds, ...}]   interventions (FIRE, DASH,
                     ReDo), in order; absent in receipts written before events existed
    model            {flops_per_token, peak_tflops, ...} or {}   free-form model facts
    warmup_intervals int: the first N logged intervals count as warm-up unless an
                     interval says otherwise (its own "warmup" flag wins)
    intervals        [{step, time_s, warmup, loss, aux_losses: {name: value}, lr,
                       tokens_per_s, tflops_per_gpu, mfu, peak_memory_bytes,
                       goodput: {buckets: {compute, data_wait, checkpoint,
                                           warmup_compile, ...}, total_s, fraction},
                       extra: {}}]
                     goodput buckets are cumulative seconds since the run started;
                     fraction = compute / total_s
    notes            {} free-form

Non-finite floats (a NaN loss) are stored as the strings "nan", "inf", "-inf" so the file
stays strict JSON; :func:`number` reads them back.

Warm-up (for comparisons): an interval is warm-up when its ``warmup`` flag is true; the
writer sets the flag for the first ``warmup_intervals`` intervals (default 1: the first
interval includes compilation, allocator growth and data-loader start-up) unless the
caller passes ``warmup=`` explicitly (e.g. a re-warm-up after a FIRE reset).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import platform
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from megacpp_mcore.errors import ReceiptError
from megacpp_mcore.jsonio import (
    atomic_write_json,
    jsonable,
    now_iso,
    number,
    stale_tmp_files,
)

SCHEMA_VERSION = 1
KIND = "megacpp-receipt"
STANDARD_BUCKETS = ("compute", "data_wait", "checkpoint", "warmup_compile")
FINAL_STATUSES = ("completed", "interrupted", "terminated")
REQUIRED_KEYS = {
    "schema_version": int,
    "kind": str,
    "run": dict,
    "recipe": dict,
    "backends": dict,
    "versions": dict,
    "parallel": dict,
    "features": list,
    "intervals": list,
}


# --------------------------------------------------------------------------- versions


def _dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        except Exception:
            return None
    return None


def collect_versions() -> dict[str, Any]:
    """Versions of the software stack; a missing package (or no GPU) is null, never an error.

    Package versions come from installed distribution metadata (no import side effects);
    CUDA, cuDNN and the GPU name come from torch when it imports.
    """
    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        "megatron_core": _dist_version("megatron-core", "megatron_core"),
        "transformer_engine": _dist_version(
            "transformer-engine", "transformer_engine", "transformer-engine-torch"
        ),
        "mamba_ssm": _dist_version("mamba-ssm", "mamba_ssm"),
        "causal_conv1d": _dist_version("causal-conv1d", "causal_conv1d"),
        "flash_linear_attention": _dist_version("flash-linear-attention", "fla"),
        "triton": _dist_version("triton", "pytorch-triton"),
        "megacpp_mcore": _dist_version("megacpp-mcore"),
        "cuda": None,
        "cudnn": None,
        "gpu_name": None,
        "gpu_count": 0,
    }
    try:
        import torch

        versions["torch"] = versions["torch"] or torch.__version__
        versions["cuda"] = torch.version.cuda
        with contextlib.suppress(Exception):
            versions["cudnn"] = torch.backends.cudnn.version()
        if torch.cuda.is_available():
            versions["gpu_count"] = torch.cuda.device_count()
            versions["gpu_name"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    if versions["megacpp_mcore"] is None:
        with contextlib.suppress(Exception):
            from megacpp_mcore import __version__

            versions["megacpp_mcore"] = __version__
    return versions


# --------------------------------------------------------------------------- goodput


class Goodput:
    """Wall time split into buckets (cumulative seconds), for the receipt's goodput.

    ``with goodput.measure("compute"): ...`` or ``goodput.add("data_wait", seconds)``.
    Standard buckets: compute, data_wait, checkpoint, warmup_compile; any other name
    (``plasticity``, ``eval``) opens a new bucket. :meth:`snapshot` adds ``other`` (wall
    time since start not in any bucket) and the goodput fraction ``compute / total_s``.
    """

    def __init__(self, clock=time.perf_counter) -> None:
        self._clock = clock
        self.start = clock()
        self.buckets: dict[str, float] = dict.fromkeys(STANDARD_BUCKETS, 0.0)

    def add(self, bucket: str, seconds: float) -> None:
        self.buckets[bucket] = self.buckets.get(bucket, 0.0) + float(seconds)

    @contextlib.contextmanager
    def measure(self, bucket: str) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            self.add(bucket, self._clock() - t0)

    def snapshot(self) -> dict[str, Any]:
        wall = self._clock() - self.start
        buckets = dict(self.buckets)
        tracked = sum(buckets.values())
        buckets["other"] = max(0.0, wall - tracked)
        total = max(wall, tracked)
        return goodput_record(buckets, total)


def goodput_record(buckets: Mapping[str, float], total_s: float | None = None) -> dict[str, Any]:
    """``{buckets, total_s, fraction}``; total defaults to the sum of the buckets."""
    clean = dict.fromkeys(STANDARD_BUCKETS, 0.0)  # standard buckets first, then the rest
    clean.update({str(k): float(v) for k, v in buckets.items()})
    total = float(total_s) if total_s is not None else sum(clean.values())
    fraction = clean["compute"] / total if total > 0 else None
    return {"buckets": clean, "total_s": total, "fraction": fraction}


# --------------------------------------------------------------------------- how a run ends


class Terminated(SystemExit):
    """SIGTERM turned into an exception (by :func:`sigterm_raises`), so ``finally`` blocks run,
    the receipt ends ``terminated`` instead of staying ``running``, and the process exits with
    status 143 (128 + SIGTERM, what the default action reports) without a traceback."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (the
    previous handler comes back afterwards). Elsewhere than the main thread, a no-op: Python
    delivers signals to the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- the receipt


def _roles(layout: Any) -> dict[str, Any] | None:
    """The receipt's ``pattern`` section from a per-layer plan (every layer with its variant,
    Megatron symbol, stack slot and backend path), a Layout or a pattern string."""
    if layout is None:
        return None
    if isinstance(layout, str):
        from megacpp_mcore.layout import resolve

        layout = resolve(layout)
    planned = {}
    if hasattr(layout, "all_layers"):  # a megacpp_mcore.plan.ModelPlan
        planned = {(x.mtp_part, x.number): x for x in layout.all_layers}
        layout = layout.layout

    def role(layer: Any) -> dict[str, Any]:
        entry = {"number": layer.number, "letter": layer.letter, "family": layer.family}
        built = planned.get((layer.mtp_part, layer.number))
        if built is not None:
            entry.update(variant=built.variant, symbol=built.symbol, slot=built.slot,
                         path=built.path)
        return entry

    return {
        "pattern": layout.canonical,
        "depth": layout.depth,
        "roles": [role(layer) for layer in layout.layers],
        "mtp_roles": [{"mtp_part": layer.mtp_part, **role(layer)}
                      for layer in layout.mtp_layers],
    }


def default_run_id(recipe_name: str | None = None) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in (recipe_name or "run"))
    return f"{stamp}-{name}-{uuid.uuid4().hex[:6]}"


class Receipt:
    """One run's receipt, bound to its file. Every mutating call rewrites the file atomically.

    Build with :meth:`create` (a new run) or :func:`load_receipt` (read one back). The JSON
    document is ``self.data`` (schema in the module docstring).
    """

    def __init__(self, path: Path | str, data: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data = data
        self._t0: float | None = None

    # ---- creation

    @classmethod
    def create(
        cls,
        path: Path | str | None = None,
        *,
        receipt_dir: Path | str = "runs",
        run_id: str | None = None,
        recipe_name: str | None = None,
        recipe_hash: str | None = None,
        layout: Any = None,
        backends: Mapping[str, Mapping[str, Any]] | None = None,
        parallel: Any = None,
        command_line: Sequence[str] | None = None,
        versions: Mapping[str, Any] | None = None,
        warmup_intervals: int = 1,
        model: Mapping[str, Any] | None = None,
        notes: Mapping[str, Any] | None = None,
        write: bool = True,
    ) -> Receipt:
        """Start a receipt (status ``running``) and write it.

        ``path`` defaults to ``receipt_dir/<run_id>.json``. ``layout`` is the per-layer plan
        (``megacpp_mcore.plan.ModelPlan``), a Layout or a pattern string; ``backends`` maps a
        family to ``{"requested": ..., "observed": ...}``; ``parallel`` is a ParallelConfig or a
        mapping; ``versions`` defaults to :func:`collect_versions`; ``command_line`` to
        ``sys.argv``.
        """
        run_id = run_id or default_run_id(recipe_name)
        if path is None:
            path = Path(receipt_dir) / f"{run_id}.json"
        path = Path(path)
        if warmup_intervals < 0:
            raise ReceiptError(f"warmup_intervals must be >= 0, got {warmup_intervals}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ReceiptError(f"cannot create receipt folder {path.parent}: {err}") from err
        data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "run": {
                "id": run_id,
                "start_time": now_iso(),
                "end_time": None,
                "status": "running",
                "command_line": list(command_line if command_line is not None else sys.argv),
                "host": socket.gethostname(),
                "user": _user(),
                "pid": os.getpid(),
            },
            "recipe": {"name": recipe_name, "hash": recipe_hash},
            "pattern": _roles(layout),
            "backends": jsonable(dict(backends or {})),
            "versions": jsonable(dict(versions) if versions is not None else collect_versions()),
            "parallel": jsonable(parallel if parallel is not None else {}),
            "features": [],
            "events": [],
            "model": jsonable(dict(model or {})),
            "warmup_intervals": int(warmup_intervals),
            "intervals": [],
            "notes": jsonable(dict(notes or {})),
        }
        receipt = cls(path, data)
        receipt._t0 = time.monotonic()
        for stale in stale_tmp_files(path):
            with contextlib.suppress(OSError):
                stale.unlink()
        if write:
            receipt.write()
        return receipt

    # ---- updates

    def write(self) -> None:
        """Rewrite the file atomically (called by every update below)."""
        try:
            atomic_write_json(self.path, self.data)
        except OSError as err:
            raise ReceiptError(f"cannot write receipt {self.path}: {err}") from err

    def set_backend(
        self, family: str, requested: Any = None, observed: Any = None, *, write: bool = True
    ) -> None:
        """Record the backend asked for and the one that really ran for a block family."""
        entry = self.data["backends"].setdefault(family, {"requested": None, "observed": None})
        if requested is not None:
            entry["requested"] = jsonable(requested)
        if observed is not None:
            entry["observed"] = jsonable(observed)
        if write:
            self.write()

    def add_feature(
        self,
        name: str,
        from_step: int,
        settings: Mapping[str, Any] | None = None,
        *,
        write: bool = True,
    ) -> None:
        """Record a training-time feature (plasticity, STP, ...) active from ``from_step``."""
        self.data["features"].append(
            {"name": name, "from_step": int(from_step), "settings": jsonable(settings or {})}
        )
        if write:
            self.write()

    def add_events(self, events: Sequence[Mapping[str, Any]], *, write: bool = True) -> None:
        """Append interventions (``{"step", "kind", "touched", "seconds", ...}``)."""
        if not events:
            return
        for event in events:
            for key, kind in (("step", int), ("kind", str)):
                if not isinstance(event.get(key), kind):
                    raise ReceiptError(f"event {dict(event)!r}: {key!r} must be a {kind.__name__}")
        self.data.setdefault("events", []).extend(jsonable(dict(e)) for e in events)
        if write:
            self.write()

    def log_interval(
        self,
        step: int,
        *,
        loss: float | None = None,
        aux_losses: Mapping[str, float] | None = None,
        lr: float | None = None,
        tokens_per_s: float | None = None,
        tflops_per_gpu: float | None = None,
        mfu: float | None = None,
        peak_memory_bytes: int | None = None,
        goodput: Goodput | Mapping[str, Any] | None = None,
        warmup: bool | None = None,
        write: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        """Append one log-interval record and rewrite the receipt.

        ``goodput`` is a :class:`Goodput` (snapshotted now), a ready ``{buckets, total_s,
        fraction}`` record, or a plain ``{bucket: seconds}`` mapping (total = their sum).
        ``warmup`` defaults to "this is one of the first ``warmup_intervals`` intervals".
        Extra keyword values go to the record's ``extra`` dict.
        """
        intervals = self.data["intervals"]
        if warmup is None:
            warmup = len(intervals) < int(self.data.get("warmup_intervals", 1))
        if isinstance(goodput, Goodput):
            good = goodput.snapshot()
        elif isinstance(goodput, Mapping) and "buckets" in goodput:
            good = goodput_record(goodput["buckets"], goodput.get("total_s"))
        elif isinstance(goodput, Mapping):
            good = goodput_record(goodput)
        else:
            good = None
        record = {
            "step": int(step),
            "time_s": (time.monotonic() - self._t0) if self._t0 is not None else None,
            "warmup": bool(warmup),
            "loss": loss,
            "aux_losses": dict(aux_losses or {}),
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": tflops_per_gpu,
            "mfu": mfu,
            "peak_memory_bytes": peak_memory_bytes,
            "goodput": good,
            "extra": dict(extra),
        }
        record = jsonable(record)
        intervals.append(record)
        if write:
            self.write()
        return record

    def finish(self, status: str = "completed") -> None:
        """Record the end time and the final status and write the receipt.

        ``status`` is ``"completed"``, ``"interrupted"``, ``"terminated"`` or
        ``"failed: <reason>"``.
        """
        if not (status in FINAL_STATUSES or status.startswith("failed")):
            raise ReceiptError(
                f"unknown final status {status!r}: use 'completed', 'interrupted', "
                "'terminated' or 'failed: <reason>'"
            )
        self.data["run"]["end_time"] = now_iso()
        self.data["run"]["status"] = status
        self.write()

    def resume(self, step: int, command_line: Sequence[str] | None = None) -> None:
        """Continue this receipt in a run resumed from a checkpoint at ``step``.

        Intervals past ``step`` (logged after the checkpoint by the interrupted run) are
        dropped, since the resumed run recomputes them; the status returns to ``running``
        and the resumption is listed under ``run.resumes``.
        """
        self.data["intervals"] = [iv for iv in self.data["intervals"] if iv["step"] <= step]
        self.data["run"]["status"] = "running"
        self.data["run"]["end_time"] = None
        self.data["run"].setdefault("resumes", []).append({
            "step": int(step),
            "time": now_iso(),
            "command_line": list(command_line if command_line is not None else sys.argv),
        })
        last_time = max((iv.get("time_s") or 0.0 for iv in self.data["intervals"]), default=0.0)
        self._t0 = time.monotonic() - last_time
        self.write()

    @contextlib.contextmanager
    def guard(self) -> Iterator[Receipt]:
        """Finish the receipt however the block ends: ``completed`` on normal exit,
        ``terminated`` on SIGTERM (turned into :class:`Terminated` while the block runs in
        the main thread), ``interrupted`` on KeyboardInterrupt/SystemExit, ``failed:
        <Type>: <message>`` on any other exception. Exceptions are re-raised."""
        try:
            with sigterm_raises():
                yield self
        except Terminated:
            self.finish("terminated")
            raise
        except (KeyboardInterrupt, SystemExit):
            self.finish("interrupted")
            raise
        except BaseException as err:
            self.finish(f"failed: {type(err).__name__}: {err}"[:500])
            raise
        else:
            if self.data["run"]["status"] == "running":
                self.finish("completed")

    # ---- reading

    @property
    def run_id(self) -> str:
        return str(self.data["run"].get("id"))

    @property
    def intervals(self) -> list[dict[str, Any]]:
        return self.data["intervals"]

    @property
    def label(self) -> str:
        return self.run_id or self.path.stem

    def warmup_flags(self) -> list[bool]:
        """Per interval: is it warm-up? Its own ``warmup`` flag, else "among the first
        ``warmup_intervals``" (the receipt-level count, default 1)."""
        n = int(self.data.get("warmup_intervals", 1))
        return [
            bool(iv["warmup"]) if iv.get("warmup") is not None else i < n
            for i, iv in enumerate(self.intervals)
        ]

    def post_warmup(self) -> list[dict[str, Any]]:
        """The intervals that are not warm-up."""
        return [iv for iv, w in zip(self.intervals, self.warmup_flags(), strict=True) if not w]

    def last_interval(self) -> dict[str, Any] | None:
        return self.intervals[-1] if self.intervals else None


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:
        return None


#: largest receipt read (a receipt grows by about 600 bytes per logged interval, so this is
#: some 400,000 intervals): a wrong or runaway file fails fast instead of filling memory.
MAX_RECEIPT_BYTES = 256 << 20
#: deepest JSON nesting accepted (the schema uses 4 levels; free-form settings a few more).
MAX_RECEIPT_NESTING = 64
_NUMBER = "a number (or the string nan, inf or -inf)"
#: interval fields the readers use as numbers, each optional and nullable.
_INTERVAL_NUMBERS = ("time_s", "loss", "lr", "tokens_per_s", "tflops_per_gpu", "mfu",
                     "peak_memory_bytes")


def receipt_destination(text: str | Path) -> tuple[Path | None, Path | None]:
    """A ``--receipt`` value as ``(file, folder)``, exactly one of them set.

    A value ending in ``/`` or naming an existing folder is a folder the run writes
    ``<run-id>.json`` into (created if needed), never a file named like the folder; anything
    else is the receipt file itself. Contradictions are a :class:`ReceiptError`.
    """
    raw = str(text)
    if not raw.strip():
        raise ReceiptError("--receipt: empty path; give a file (run.json) or a folder (runs/)")
    path = Path(raw)
    if raw.endswith(("/", os.sep)) or path.is_dir():
        if path.exists() and not path.is_dir():
            raise ReceiptError(f"--receipt {raw}: ends with '/' (a folder) but {path} is a file")
        return None, path
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ReceiptError(f"--receipt {raw}: {parent} is a file, not a folder")
            break
    return path, None


def load_receipt(path: Path | str) -> Receipt:
    """Read and validate a receipt; a :class:`ReceiptError` says what is wrong and where."""
    path = Path(path)
    if not path.exists():
        raise ReceiptError(f"receipt not found: {path}")
    if path.is_dir():
        raise ReceiptError(f"{path} is a directory, not a receipt file")
    try:
        size = path.stat().st_size
        if size > MAX_RECEIPT_BYTES:
            raise ReceiptError(f"{path}: {size} bytes is larger than any receipt this reader "
                               f"accepts ({MAX_RECEIPT_BYTES}); not a receipt")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReceiptError(f"cannot read receipt {path}: {err}") from err
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, huge integers, deep nesting
        raise ReceiptError(f"{path} is not valid JSON ({err}); not a receipt") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise ReceiptError(f'{path} is not a megacpp receipt (no "kind": "{KIND}")')
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ReceiptError(f"{path}: schema_version missing or not an integer")
    if version > SCHEMA_VERSION:
        raise ReceiptError(
            f"{path}: schema_version {version} is newer than this reader ({SCHEMA_VERSION})"
        )
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise ReceiptError(
                f"{path}: field {key!r} missing or not a{'n' if kind is int else ''} "
                f"{kind.__name__}; not a valid receipt"
            )
    check_receipt(data, str(path))
    return Receipt(path, data)


def check_receipt(data: dict[str, Any], where: str) -> None:
    """Every field the readers (show, compare, plot, resume) use has the schema's type, so
    they never meet a string where a number belongs; the error names the field's path."""

    def fail(path: str, problem: str) -> ReceiptError:
        return ReceiptError(f"{where}: {path}: {problem}; not a valid receipt")

    def show(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    def need(value: Any, path: str, kind: str, *, null: bool = True) -> None:
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "dict": isinstance(value, dict),
            "list": isinstance(value, list),
            "number": number(value) is not None,
        }[kind]
        if not ok and not (null and value is None):
            what = {"str": "a string", "int": "an integer", "bool": "true or false",
                    "dict": "an object", "list": "a list", "number": _NUMBER}[kind]
            raise fail(path, f"expected {what}{' or null' if null else ''}, got {show(value)}")

    def nesting(value: Any, path: str, level: int = 0) -> None:
        if level > MAX_RECEIPT_NESTING:
            raise fail(path, f"nested deeper than {MAX_RECEIPT_NESTING} levels")
        items = value.items() if isinstance(value, dict) else (
            enumerate(value) if isinstance(value, list) else ())
        for key, sub in items:
            if isinstance(sub, dict | list):
                nesting(sub, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]",
                        level + 1)

    nesting(data, "receipt")
    run = data["run"]
    for key in ("id", "start_time", "end_time", "host"):
        need(run.get(key), f"run.{key}", "str")
    need(run.get("status"), "run.status", "str", null=False)
    need(run.get("command_line"), "run.command_line", "list")
    for key in ("name", "hash"):
        need(data["recipe"].get(key), f"recipe.{key}", "str")
    pattern = data.get("pattern")
    need(pattern, "pattern", "dict")
    if pattern is not None:
        need(pattern.get("pattern"), "pattern.pattern", "str")
        need(pattern.get("depth"), "pattern.depth", "int")
        for group in ("roles", "mtp_roles"):
            need(pattern.get(group), f"pattern.{group}", "list", null=group == "mtp_roles")
            for i, role in enumerate(pattern.get(group) or []):
                need(role, f"pattern.{group}[{i}]", "dict", null=False)
                need(role.get("letter"), f"pattern.{group}[{i}].letter", "str", null=False)
                need(role.get("number"), f"pattern.{group}[{i}].number", "int")
    for i, feature in enumerate(data["features"]):
        need(feature, f"features[{i}]", "dict", null=False)
        need(feature.get("from_step"), f"features[{i}].from_step", "int")
        need(feature.get("settings"), f"features[{i}].settings", "dict")
    if "events" in data:
        need(data["events"], "events", "list", null=False)
    for i, event in enumerate(data.get("events") or []):
        need(event, f"events[{i}]", "dict", null=False)
    for key in ("model", "notes"):
        need(data.get(key), key, "dict")
    if "warmup_intervals" in data:
        need(data["warmup_intervals"], "warmup_intervals", "int", null=False)
    if data.get("warmup_intervals", 0) < 0:
        raise fail("warmup_intervals", f"must be >= 0, got {data['warmup_intervals']}")
    for i, iv in enumerate(data["intervals"]):
        at = f"intervals[{i}]"
        need(iv, at, "dict", null=False)
        need(iv.get("step"), f"{at}.step", "int", null=False)
        need(iv.get("warmup"), f"{at}.warmup", "bool")
        for key in _INTERVAL_NUMBERS:
            need(iv.get(key), f"{at}.{key}", "number")
        need(iv.get("aux_losses"), f"{at}.aux_losses", "dict")
        for name, value in (iv.get("aux_losses") or {}).items():
            need(value, f"{at}.aux_losses.{name}", "number")
        need(iv.get("extra"), f"{at}.extra", "dict")
        good = iv.get("goodput")
        need(good, f"{at}.goodput", "dict")
        if good is not None:
            need(good.get("buckets"), f"{at}.goodput.buckets", "dict", null=False)
            for name, value in (good.get("buckets") or {}).items():
                need(value, f"{at}.goodput.buckets.{name}", "number", null=False)
            for key in ("total_s", "fraction"):
                need(good.get(key), f"{at}.goodput.{key}", "number")
