"""Training data: a byte-level tokenizer, Megatron indexed datasets, the embedded corpus.

Tokenizer
    :class:`ByteTokenizer` maps text to its UTF-8 bytes, one token per byte: ids ``0..255``
    are the byte values and id ``256`` (:data:`EOD_ID`) is the end-of-document token, so
    ``vocab_size`` is 257. There is no padding token (``pad == -1``, Megatron's "none").
    This is exactly Megatron-Core's ``NullTokenizer`` convention (``eod = vocab_size -
    1``, ``pad = -1``), so Megatron's pretrain path needs no tokenizer of ours::

        --tokenizer-type NullTokenizer --vocab-size 257 --null-tokenizer-eod-id 256

    (:meth:`ByteTokenizer.megatron_args`; the eod flag only restates the default.) Megatron
    pads the embedding to a multiple of ``--make-vocab-size-divisible-by`` (128) x TP, i.e.
    384 rows; the extra ids never occur in the data.

Datasets
    :func:`prepare_dataset` writes text files as a Megatron indexed dataset (``PREFIX.bin`` +
    ``PREFIX.idx``) with Megatron's own ``IndexedDatasetBuilder``: one document per file, one
    sequence per document, each ending in EOD, token dtype chosen by Megatron's rule
    (``DType.optimal_dtype(vocab_size)``: uint16 below 65500). A small ``PREFIX.json``
    manifest (the :class:`DatasetSummary`) is written last, after both files are in place.
    Pass the prefix to Megatron as ``--data-path PREFIX``.

Embedded corpus
    :func:`embedded_corpus_files` collects this project's own sources and README (never
    third-party text); :func:`prepare_embedded` tokenizes them once into
    ``runs/data/embedded_<hash>`` and reuses that folder while the content hash matches.

Reading back
    :func:`open_dataset` gives Megatron's ``IndexedDataset``; :func:`load_documents` and
    :func:`load_tokens` return numpy arrays; :class:`TokenWindows` cuts deterministic
    ``[B, S+1]`` windows from the token stream for the plain-PyTorch CPU training path
    (inputs ``w[:, :-1]``, labels ``w[:, 1:]``).

Megatron (and with it torch) is imported only inside the functions that need it, so the
tokenizer and the file collection stay import-light.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megacpp_mcore.errors import DataError
from megacpp_mcore.jsonio import atomic_write_json
from megacpp_mcore.paths import REPO_ROOT

#: number of byte values; ids 0..255 are the bytes themselves.
NUM_BYTES = 256
#: end-of-document token id (Megatron NullTokenizer's default ``vocab_size - 1``).
EOD_ID = 256
#: vocabulary size: 256 bytes + EOD.
VOCAB_SIZE = 257
#: Megatron's "no padding token" id (``megatron.core.datasets.megatron_dataset._PAD_TOKEN_ID``).
NO_PAD_ID = -1

#: file suffixes collected when a directory is given to ``megacpp data prepare``.
TEXT_SUFFIXES = (".txt", ".md", ".py", ".yaml")
#: default cache folder of prepared data (``runs/`` is git-ignored).
DEFAULT_DATA_DIR = REPO_ROOT / "runs" / "data"
#: manifest version; bump when the manifest layout changes.
MANIFEST_VERSION = 1


# --------------------------------------------------------------------------- tokenizer


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, 256 is end-of-document (EOD).

    It has the attributes Megatron's GPT dataset path reads from a tokenizer (``eod``,
    ``pad``, ``vocab_size``, ``unique_identifiers``), so it can be passed as
    ``GPTDatasetConfig(tokenizer=...)`` directly; Megatron's own pretrain flow uses
    ``NullTokenizer`` with the same ids (see :meth:`megatron_args`).
    """

    eod: int = EOD_ID
    eod_id: int = EOD_ID
    pad: int = NO_PAD_ID
    pad_id: int = NO_PAD_ID

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What Megatron hashes to name its dataset index caches."""
        return OrderedDict(
            {
                "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "vocab_size": VOCAB_SIZE,
                "eod_id": EOD_ID,
                "pad_id": NO_PAD_ID,
            }
        )

    def encode(self, text: str, *, add_eod: bool = False) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids (plus EOD when ``add_eod``)."""
        ids = list(text.encode("utf-8"))
        if add_eod:
            ids.append(EOD_ID)
        return ids

    def decode(self, ids: Iterable[int], *, keep_eod: bool = False) -> str:
        """Bytes back to text; EOD is dropped (or written as a newline with ``keep_eod``).

        Invalid UTF-8 (a window cut inside a multi-byte character) decodes to U+FFFD.
        Ids outside the vocabulary raise a ValueError.
        """
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < NUM_BYTES:
                out.append(i)
            elif i == EOD_ID:
                if keep_eod:
                    out.append(ord("\n"))
            else:
                raise ValueError(f"token id {i} is outside the byte vocabulary 0..{EOD_ID}")
        return out.decode("utf-8", errors="replace")

    @staticmethod
    def megatron_args() -> list[str]:
        """Megatron-LM flags that reproduce this tokenizer with Megatron's NullTokenizer."""
        return [
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            str(VOCAB_SIZE),
            "--null-tokenizer-eod-id",
            str(EOD_ID),
        ]

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={VOCAB_SIZE}, eod={EOD_ID})"


def token_dtype(vocab_size: int = VOCAB_SIZE) -> type[np.number]:
    """The on-disk token dtype, by Megatron's own rule (``DType.optimal_dtype``)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`prepare_dataset` wrote (also stored as ``PREFIX.json``).

    Attributes:
        prefix: the dataset prefix (``PREFIX.bin`` / ``PREFIX.idx``), as given to Megatron.
        documents: documents written (one per non-empty input file).
        tokens: tokens written, EOD tokens included.
        bytes: UTF-8 bytes of input text (tokens = bytes + documents).
        dtype: numpy dtype of the stored tokens (uint16 for the byte vocabulary).
        vocab_size: vocabulary the dtype was chosen for.
        eod_id: the end-of-document id appended to every document.
        content_hash: sha256 over the files' relative names and contents.
        files: the input files, in document order.
        skipped_empty: empty input files (no document written for them).
    """

    prefix: str
    documents: int
    tokens: int
    bytes: int
    dtype: str
    vocab_size: int = VOCAB_SIZE
    eod_id: int = EOD_ID
    content_hash: str = ""
    files: tuple[str, ...] = ()
    skipped_empty: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = list(self.files)
        data["skipped_empty"] = list(self.skipped_empty)
        data["manifest_version"] = MANIFEST_VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetSummary:
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["files"] = tuple(kwargs.get("files", ()))
        kwargs["skipped_empty"] = tuple(kwargs.get("skipped_empty", ()))
        return cls(**kwargs)

    def __str__(self) -> str:
        lines = [
            f"dataset   {self.prefix}  (.bin/.idx)",
            f"documents {self.documents}",
            f"tokens    {self.tokens}  ({self.bytes} bytes of text + {self.documents} EOD)",
            f"dtype     {self.dtype}  (vocab {self.vocab_size}, eod {self.eod_id})",
        ]
        if self.skipped_empty:
            lines.append(f"skipped   {len(self.skipped_empty)} empty file(s)")
        lines.append(f"hash      {self.content_hash[:16]}")
        return "\n".join(lines)


def _display(path: Path) -> str:
    """A path relative to the repository when inside it (stable across checkouts)."""
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"input file not found: {path}")
    if path.is_dir():
        raise DataError(
            f"{path} is a directory where a text file is expected (the CLI walks directories "
            f"for {', '.join(TEXT_SUFFIXES)}; prepare_dataset takes files)"
        )
    if not path.is_file():
        raise DataError(f"{path} is not a regular file")


def _read_text_bytes(path: Path) -> bytes:
    """The file's bytes, checked to be UTF-8 (a DataError names the file and the offset)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text: invalid byte 0x{raw[err.start]:02x} at offset "
            f"{err.start} ({err.reason}); convert it to UTF-8 or leave it out"
        ) from err
    return raw


def content_hash(files: Sequence[Path]) -> str:
    """sha256 over each file's repository-relative name and bytes, in the given order."""
    digest = hashlib.sha256()
    digest.update(f"megacpp-byte-v{VOCAB_SIZE}-eod{EOD_ID}\n".encode())
    for path in files:
        data = path.read_bytes()
        digest.update(_display(path).encode("utf-8") + b"\0")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _prepare_output_dir(output_prefix: Path) -> Path:
    folder = output_prefix.parent
    if output_prefix.name in ("", ".", ".."):
        raise DataError(f"output prefix {output_prefix} has no file name")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"output folder {folder} exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create output folder {folder}: {err.strerror or err}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"output folder {folder} is not writable")
    return folder


def prepare_dataset(files: Sequence[Path | str], output_prefix: Path | str) -> DatasetSummary:
    """Write ``files`` as a Megatron indexed dataset at ``output_prefix`` (.bin/.idx/.json).

    One document per file (its UTF-8 bytes, then EOD); empty files are skipped (listed in
    the summary). All inputs are checked before anything is written; the three outputs are
    written under temporary names and moved into place, the manifest last, so a killed
    run never leaves a dataset that looks complete. Raises :class:`DataError` for missing
    files, directories, non-UTF-8 text, an empty corpus or an unwritable output folder.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("no input files: give at least one text file")
    for path in paths:
        _check_file(path)
    texts = [(path, _read_text_bytes(path)) for path in paths]
    kept = [(path, raw) for path, raw in texts if raw]
    skipped = tuple(_display(path) for path, raw in texts if not raw)
    if not kept:
        raise DataError(
            f"empty corpus: the {len(paths)} input file(s) hold no text, so there are no tokens"
        )
    if skipped:
        warnings.warn(
            f"skipping {len(skipped)} empty file(s): {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""),
            stacklevel=2,
        )

    output_prefix = Path(output_prefix)
    folder = _prepare_output_dir(output_prefix)

    from megatron.core.datasets.indexed_dataset import (
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    dtype = token_dtype(VOCAB_SIZE)
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".{output_prefix.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise DataError(f"output folder {folder} is not writable: {err.strerror or err}") from err
    tmp_prefix = str(Path(tmp_dir) / "data")
    n_tokens = 0
    n_bytes = 0
    try:
        builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
        for _, raw in kept:
            doc = np.empty(len(raw) + 1, dtype=dtype)
            doc[:-1] = np.frombuffer(raw, dtype=np.uint8)
            doc[-1] = EOD_ID
            builder.add_document(doc, [doc.size])
            n_tokens += doc.size
            n_bytes += len(raw)
        builder.finalize(get_idx_path(tmp_prefix))
        summary = DatasetSummary(
            prefix=str(output_prefix),
            documents=len(kept),
            tokens=n_tokens,
            bytes=n_bytes,
            dtype=np.dtype(dtype).name,
            content_hash=content_hash([path for path, _ in kept]),
            files=tuple(_display(path) for path, _ in kept),
            skipped_empty=skipped,
        )
        prefix = str(output_prefix)
        os.replace(get_bin_path(tmp_prefix), get_bin_path(prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(prefix))
        # The summary goes last: its presence (with a matching hash) marks a finished dataset.
        atomic_write_json(Path(prefix + ".json"), summary.to_json())
    except OSError as err:
        raise DataError(f"cannot write dataset {output_prefix}: {err.strerror or err}") from err
    finally:
        for leftover in Path(tmp_dir).glob("*"):
            leftover.unlink(missing_ok=True)
        Path(tmp_dir).rmdir()
    return summary


def read_summary(prefix: Path | str) -> DatasetSummary:
    """The manifest ``PREFIX.json`` written next to a prepared dataset."""
    path = Path(str(prefix) + ".json")
    try:
        return DatasetSummary.from_json(json.loads(path.read_text()))
    except FileNotFoundError as err:
        raise DataError(f"no dataset manifest at {path}") from err
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"unreadable dataset manifest {path}: {err}") from err


def collect_files(inputs: Sequence[Path | str]) -> list[Path]:
    """Files named directly, plus the text files under each directory (sorted, recursive).

    Directories are walked for :data:`TEXT_SUFFIXES`, skipping hidden folders and
    ``__pycache__``. A missing path is a DataError.
    """
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"input not found: {path}")
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix in TEXT_SUFFIXES
                and p.is_file()
                and not any(
                    part.startswith(".") or part == "__pycache__"
                    for part in p.relative_to(path).parts
                )
            )
            out.extend(found)
        else:
            out.append(path)
    return out


# --------------------------------------------------------------------------- embedded corpus

#: (folder relative to the repository root, glob) of the embedded corpus, in this order.
EMBEDDED_GLOBS: tuple[tuple[str, str], ...] = (
    (".", "README.md"),
    ("megacpp_mcore", "**/*.py"),
    ("patterns", "*.yaml"),
    ("recipes", "*.yaml"),
)


def embedded_corpus_files(root: Path = REPO_ROOT) -> list[Path]:
    """This project's own text: package sources, README, pattern families, recipes.

    Collected at run time from the checkout (``megacpp_mcore.paths.REPO_ROOT``); only files
    inside ``root`` (symlinks leading out are dropped), never a virtual environment or
    caches, so no third-party text enters. Sorted within each group, so the order (and the
    content hash) is deterministic.
    """
    root = root.resolve()
    files: list[Path] = []
    seen: set[Path] = set()
    for folder, pattern in EMBEDDED_GLOBS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.glob(pattern)):
            real = path.resolve()
            rel = real.relative_to(root) if real.is_relative_to(root) else None
            if (
                rel is None
                or not real.is_file()
                or real in seen
                or any(part.startswith(".") or part == "__pycache__" for part in rel.parts)
                or "site-packages" in rel.parts
            ):
                continue
            seen.add(real)
            files.append(real)
    if not files:
        raise DataError(f"no embedded corpus found under {root} (is this a checkout?)")
    return files


def prepare_embedded(output_dir: Path | str | None = None) -> Path:
    """Prepare the embedded corpus once; return its prefix ``DIR/embedded_<hash>/embedded``.

    ``output_dir`` defaults to ``runs/data``. A folder whose manifest carries the same
    content hash (and whose .bin/.idx exist) is reused as is; any change to the sources
    gives a new hash and a new folder.
    """
    files = embedded_corpus_files()
    digest = content_hash(files)
    folder = Path(output_dir) if output_dir is not None else DEFAULT_DATA_DIR
    prefix = folder / f"embedded_{digest[:16]}" / "embedded"
    if _is_prepared(prefix, digest):
        return prefix
    prepare_dataset(files, prefix)
    return prefix


def _is_prepared(prefix: Path, digest: str) -> bool:
    if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        return False
    try:
        return read_summary(prefix).content_hash == digest
    except DataError:
        return False


# --------------------------------------------------------------------------- reading back


def open_dataset(prefix: Path | str):
    """Megatron's ``IndexedDataset`` for ``prefix`` (a DataError if .bin/.idx are missing)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(prefix)
    if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
        raise DataError(f"no indexed dataset at {prefix} (expected {prefix}.bin and .idx)")
    return IndexedDataset(prefix, mmap=True)


def load_documents(prefix: Path | str) -> list[np.ndarray]:
    """Every document as a numpy array of token ids (EOD included), read by Megatron."""
    dataset = open_dataset(prefix)
    docs = dataset.document_indices
    out = []
    for d in range(len(docs) - 1):
        parts = [np.array(dataset[i]) for i in range(int(docs[d]), int(docs[d + 1]))]
        out.append(np.concatenate(parts) if parts else np.empty(0, dtype=dataset.index.dtype))
    return out


def _stream_view(dataset) -> np.ndarray:
    """The whole token stream of an IndexedDataset as a read-only view of its mmap.

    Keep ``dataset`` referenced while the view is used: Megatron's ``IndexedDataset``
    closes its mmap in ``__del__`` even while views exist, and reading a view after that
    is a segmentation fault (the same holds for the arrays ``dataset[i]`` returns).
    """
    count = int(np.sum(dataset.sequence_lengths, dtype=np.int64))
    if count == 0:
        return np.empty(0, dtype=dataset.index.dtype)
    offset = int(dataset.index.sequence_pointers[0])
    return dataset.bin_reader.read(dtype=dataset.index.dtype, count=count, offset=offset)


def load_tokens(prefix: Path | str) -> np.ndarray:
    """The whole token stream (documents concatenated, EODs included) as an int64 copy."""
    dataset = open_dataset(prefix)  # must outlive the view (see _stream_view)
    tokens = _stream_view(dataset).astype(np.int64)
    del dataset
    return tokens


class TokenWindows:
    """Deterministic ``[batch_size, seq_length + 1]`` token windows for CPU training.

    ``source`` is a dataset prefix (read through Megatron's memory-mapped reader, never
    loaded whole) or an array of token ids. ``self.tokens`` is then a view of the mmap,
    valid only while this object lives; batches are fresh int64 copies.

    Windows are cut at random offsets of the concatenated token stream (documents are
    separated by EOD, as in Megatron's GPT dataset). Batch ``i`` depends only on ``seed``
    and ``i``, so a resumed run sees the same data from its step on: ``windows.batch(i)``;
    iterating yields batches ``start, start+1, ...`` forever (or ``num_batches`` of them).
    """

    def __init__(
        self,
        source: Path | str | np.ndarray,
        batch_size: int,
        seq_length: int,
        seed: int = 0,
    ) -> None:
        if batch_size <= 0 or seq_length <= 0:
            raise DataError(
                f"batch_size and seq_length must be positive, got {batch_size}, {seq_length}"
            )
        if isinstance(source, np.ndarray):
            self._dataset = None
            tokens = np.ascontiguousarray(source)
        else:  # a memory-mapped view of the .bin file; self._dataset keeps the mmap open
            self._dataset = open_dataset(source)
            tokens = _stream_view(self._dataset)
        if tokens.size < seq_length + 1:
            raise DataError(
                f"the dataset holds {tokens.size} tokens, fewer than one window of "
                f"seq_length + 1 = {seq_length + 1}"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.seed = seed

    @property
    def num_offsets(self) -> int:
        return self.tokens.size - self.seq_length

    def offsets(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(0, self.num_offsets, size=self.batch_size)

    def batch(self, index: int):
        """Batch number ``index`` as a torch.LongTensor ``[B, S+1]``."""
        import torch

        starts = self.offsets(index)
        span = np.arange(self.seq_length + 1)
        return torch.from_numpy(self.tokens[starts[:, None] + span[None, :]].astype(np.int64))

    def iterate(self, start: int = 0, num_batches: int | None = None) -> Iterator[Any]:
        index = start
        while num_batches is None or index < start + num_batches:
            yield self.batch(index)
            index += 1

    def __iter__(self) -> Iterator[Any]:
        return self.iterate()


def token_windows(
    prefix: Path | str, batch_size: int, seq_length: int, seed: int = 0, start: int = 0
) -> Iterator[Any]:
    """Endless deterministic ``[B, S+1]`` batches from ``prefix`` (see :class:`TokenWindows`)."""
    return TokenWindows(prefix, batch_size, seq_length, seed).iterate(start)
