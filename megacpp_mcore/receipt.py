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
                     "failed: <reason>" or "interrupted"
    recipe           {name, hash}       hash: sha256 of the recipe (see content_hash)
    pattern          {pattern, depth, roles: [{number, letter, family}],
                      mtp_roles: [{mtp_part, number, letter, family}]} or null
    backends         {family: {requested, observed}}   as given by the caller
    versions         {python, torch, megatron_core, transformer_engine, mamba_ssm,
                      causal_conv1d, flash_linear_attention, triton, cuda, cudnn,
                      gpu_name, gpu_count, megacpp_mcore}   null where absent
    parallel         {tensor, pipeline, expert, context, data, ...}   as given
    features         [{name, from_step, settings}]   training-time features (plasticity, STP)
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
import hashlib
import json
import math
import os
import platform
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from megacpp_mcore.errors import ReceiptError

SCHEMA_VERSION = 1
KIND = "megacpp-receipt"
STANDARD_BUCKETS = ("compute", "data_wait", "checkpoint", "warmup_compile")
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


# --------------------------------------------------------------------------- helpers


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def content_hash(obj: Any) -> str:
    """sha256 of a recipe: text/bytes as is, anything else as canonical JSON."""
    if isinstance(obj, bytes):
        data = obj
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
    else:
        data = json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; dataclasses become dicts, non-finite floats become strings."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, Path):
        return str(obj)
    # numpy / torch scalars
    item = getattr(obj, "item", None)
    if callable(item):
        with contextlib.suppress(Exception):
            return _jsonable(item())
    return str(obj)


def number(value: Any) -> float | None:
    """A receipt value back to a float (``"nan"``/``"inf"`` strings included); else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (tmp in the same folder, fsync, replace).

    If anything fails before the replace, the previous file is untouched and the temporary
    file is removed.
    """
    path = Path(path)
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _stale_tmp_files(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


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


# --------------------------------------------------------------------------- the receipt


def _roles(layout: Any) -> dict[str, Any] | None:
    if layout is None:
        return None
    if isinstance(layout, str):
        from megacpp_mcore.layout import resolve

        layout = resolve(layout)
    return {
        "pattern": layout.canonical,
        "depth": layout.depth,
        "roles": [
            {"number": layer.number, "letter": layer.letter, "family": layer.family}
            for layer in layout.layers
        ],
        "mtp_roles": [
            {
                "mtp_part": layer.mtp_part,
                "number": layer.number,
                "letter": layer.letter,
                "family": layer.family,
            }
            for layer in layout.mtp_layers
        ],
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

        ``path`` defaults to ``receipt_dir/<run_id>.json``. ``layout`` is a Layout (or a
        pattern string); ``backends`` maps a family to ``{"requested": ..., "observed":
        ...}``; ``parallel`` is a ParallelConfig or a mapping; ``versions`` defaults to
        :func:`collect_versions`; ``command_line`` to ``sys.argv``.
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
                "start_time": _now_iso(),
                "end_time": None,
                "status": "running",
                "command_line": list(command_line if command_line is not None else sys.argv),
                "host": socket.gethostname(),
                "user": _user(),
                "pid": os.getpid(),
            },
            "recipe": {"name": recipe_name, "hash": recipe_hash},
            "pattern": _roles(layout),
            "backends": _jsonable(dict(backends or {})),
            "versions": _jsonable(dict(versions) if versions is not None else collect_versions()),
            "parallel": _jsonable(parallel if parallel is not None else {}),
            "features": [],
            "model": _jsonable(dict(model or {})),
            "warmup_intervals": int(warmup_intervals),
            "intervals": [],
            "notes": _jsonable(dict(notes or {})),
        }
        receipt = cls(path, data)
        receipt._t0 = time.monotonic()
        for stale in _stale_tmp_files(path):
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
            entry["requested"] = _jsonable(requested)
        if observed is not None:
            entry["observed"] = _jsonable(observed)
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
            {"name": name, "from_step": int(from_step), "settings": _jsonable(settings or {})}
        )
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
        record = _jsonable(record)
        intervals.append(record)
        if write:
            self.write()
        return record

    def finish(self, status: str = "completed") -> None:
        """Record the end time and the final status and write the receipt.

        ``status`` is ``"completed"``, ``"interrupted"`` or ``"failed: <reason>"``.
        """
        if not (status in ("completed", "interrupted") or status.startswith("failed")):
            raise ReceiptError(
                f"unknown final status {status!r}: use 'completed', 'interrupted' or "
                "'failed: <reason>'"
            )
        self.data["run"]["end_time"] = _now_iso()
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
            "time": _now_iso(),
            "command_line": list(command_line if command_line is not None else sys.argv),
        })
        last_time = max((iv.get("time_s") or 0.0 for iv in self.data["intervals"]), default=0.0)
        self._t0 = time.monotonic() - last_time
        self.write()

    @contextlib.contextmanager
    def guard(self) -> Iterator[Receipt]:
        """Finish the receipt however the block ends: ``completed`` on normal exit,
        ``interrupted`` on KeyboardInterrupt/SystemExit, ``failed: <Type>: <message>`` on
        any other exception (which is re-raised)."""
        try:
            yield self
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


def load_receipt(path: Path | str) -> Receipt:
    """Read and validate a receipt; a :class:`ReceiptError` says what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ReceiptError(f"receipt not found: {path}")
    if path.is_dir():
        raise ReceiptError(f"{path} is a directory, not a receipt file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReceiptError(f"cannot read receipt {path}: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReceiptError(f"{path} is not valid JSON ({err}); not a receipt") from err
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
    for i, iv in enumerate(data["intervals"]):
        if not isinstance(iv, dict) or not isinstance(iv.get("step"), int):
            raise ReceiptError(f"{path}: interval {i} is not an object with an integer 'step'")
    return Receipt(path, data)


# --------------------------------------------------------------------------- show


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
                if v is None:
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
    fig.tight_layout()
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, format="png")
    except OSError as err:
        raise ReceiptError(f"cannot write plot {output}: {err}") from err
    return output


# --------------------------------------------------------------------------- command line


def _cmd_show(args) -> int:
    receipt = load_receipt(args.file)
    if args.json:
        print(json.dumps(receipt.data, indent=2))
    else:
        print(format_receipt(receipt))
    return 0


def _cmd_compare(args) -> int:
    a, b = load_receipt(args.a), load_receipt(args.b)
    if args.json:
        print(json.dumps(_jsonable(compare_receipts(a, b)), indent=2))
    else:
        print(format_comparison(a, b))
    return 0


def _cmd_plot(args) -> int:
    receipts = [load_receipt(f) for f in args.files]
    out = plot_receipts(receipts, args.output)
    print(f"wrote {out}")
    return 0


def add_receipt_subcommand(sub) -> None:
    """Register ``megacpp receipt show|compare|plot`` (called from cli.SUBCOMMANDS)."""
    p = sub.add_parser(
        "receipt",
        help="show, compare and plot run receipts (JSON)",
        description="Every training run writes one JSON receipt (schema_version "
        f"{SCHEMA_VERSION}): recipe, pattern and roles, backends, versions, parallel sizes, "
        "features, and per-interval loss, aux losses, throughput, MFU, memory and goodput.",
    )
    rsub = p.add_subparsers(dest="receipt_command", metavar="ACTION", required=True)
    show = rsub.add_parser(
        "show",
        help="readable summary of one receipt",
        description="Run, recipe, pattern, backends, versions, features, the last interval "
        "and goodput of one receipt.",
    )
    show.add_argument("file", type=Path, help="a receipt (.json)")
    show.add_argument("--json", action="store_true", help="print the whole receipt as JSON")
    show.set_defaults(handler=_cmd_show)

    cmp_ = rsub.add_parser(
        "compare",
        help="side-by-side table of two runs past warm-up",
        description="Compare two receipts step by step over the window where both runs are "
        "past warm-up: intervals flagged 'warmup' (by default the first warmup_intervals "
        "of each run, 1 unless the run said otherwise) are left out, the window starts at the "
        "later run's first post-warm-up step, and only steps both runs logged are shown, "
        "with the window means last.",
    )
    cmp_.add_argument("a", type=Path, help="receipt A (the baseline)")
    cmp_.add_argument("b", type=Path, help="receipt B")
    cmp_.add_argument("--json", action="store_true", help="print the comparison as JSON")
    cmp_.set_defaults(handler=_cmd_compare)

    plot = rsub.add_parser(
        "plot",
        help="plot loss, aux losses and tokens/s against step (PNG)",
        description="One panel each for loss, every aux loss and tokens/s, one line per "
        "receipt (hollow markers: warm-up intervals). Needs matplotlib.",
    )
    plot.add_argument("files", type=Path, nargs="+", metavar="FILE", help="receipts (.json)")
    plot.add_argument("-o", "--output", type=Path, required=True, help="output PNG path")
    plot.set_defaults(handler=_cmd_plot)
