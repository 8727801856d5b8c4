"""JSON helpers shared by receipts and data: canonical hashing, plain-JSON conversion and
the one atomic writer (tmp file in the same folder, fsync, ``os.replace``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def content_hash(obj: Any) -> str:
    """sha256 of a recipe: text/bytes as is, anything else as canonical JSON."""
    if isinstance(obj, bytes):
        data = obj
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
    else:
        data = json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


def jsonable(obj: Any) -> Any:
    """Plain JSON types; dataclasses become dicts, non-finite floats become strings."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
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
            return jsonable(item())
    return str(obj)


def number(value: Any) -> float | None:
    """A receipt value back to a float (``"nan"``/``"inf"`` strings included); else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range reads as infinity
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return value
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


def stale_tmp_files(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))
