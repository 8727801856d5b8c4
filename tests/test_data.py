"""Data: byte tokenizer, Megatron indexed datasets (round trip), the embedded corpus, errors."""

import argparse
import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megacpp_mcore.cli.main import main
from megacpp_mcore.errors import DataError
from megacpp_mcore.paths import REPO_ROOT
from megacpp_mcore.train import data
from megacpp_mcore.train.data import (
    EOD_ID,
    VOCAB_SIZE,
    ByteTokenizer,
    TokenWindows,
    collect_files,
    embedded_corpus_files,
    load_documents,
    load_tokens,
    open_dataset,
    prepare_dataset,
    prepare_embedded,
    read_summary,
)

TEXTS = {
    "a.txt": "hello world\n",
    "b.md": "# Überschrift\n\nnaïve café — 数据 🚀\n",
    "c.py": "def f(x):\n    return x * 2\n",
}


@pytest.fixture
def corpus(tmp_path: Path) -> list[Path]:
    files = []
    for name, text in TEXTS.items():
        path = tmp_path / "in" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        files.append(path)
    return files


# --------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_ids():
    tok = ByteTokenizer()
    assert tok.vocab_size == VOCAB_SIZE == 257
    assert tok.eod == EOD_ID == 256
    assert tok.pad == -1
    assert tok.encode("A\n") == [65, 10]
    assert tok.encode("é", add_eod=True) == [0xC3, 0xA9, EOD_ID]
    text = TEXTS["b.md"]
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([*ids, EOD_ID]) == text
    assert tok.decode([104, EOD_ID, 105], keep_eod=True) == "h\ni"
    assert tok.decode([0xC3]) == "\ufffd"  # a window cut inside a character
    with pytest.raises(ValueError, match="outside"):
        tok.decode([257])


def test_megatron_null_tokenizer_agrees():
    """Megatron 0.19.2's NullTokenizer with our flags has our vocab size and EOD id."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import _add_tokenizer_args

    parser = _add_tokenizer_args(argparse.ArgumentParser())
    for flags in (ByteTokenizer.megatron_args(), ByteTokenizer.megatron_args()[:4]):
        args = parser.parse_args(flags)
        args.pad_vocab_size = False
        tok = build_tokenizer(args)
        assert tok.vocab_size == VOCAB_SIZE
        assert tok.eod == EOD_ID  # default eod = vocab_size - 1 matches without the flag too
        assert tok.pad_id == -1


def test_token_dtype_follows_megatron_rule():
    from megatron.core.datasets.indexed_dataset import DType

    assert data.token_dtype() is DType.optimal_dtype(VOCAB_SIZE) is np.uint16


# --------------------------------------------------------------------------- round trip


def test_prepare_round_trip_through_megatron(corpus, tmp_path):
    prefix = tmp_path / "out" / "ds"
    summary = prepare_dataset(corpus, prefix)
    tok = ByteTokenizer()
    expected = [tok.encode(TEXTS[p.name], add_eod=True) for p in corpus]

    assert summary.documents == 3
    assert summary.bytes == sum(len(t.encode()) for t in TEXTS.values())
    assert summary.tokens == summary.bytes + 3 == sum(map(len, expected))
    assert summary.dtype == "uint16"
    assert read_summary(prefix) == summary
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["ds.bin", "ds.idx", "ds.json"]

    dataset = open_dataset(prefix)  # Megatron's own reader
    assert len(dataset) == 3
    assert list(dataset.document_indices) == [0, 1, 2, 3]
    assert dataset.index.dtype is np.uint16
    for i, ids in enumerate(expected):
        assert dataset[i].tolist() == ids
    assert [d.tolist() for d in load_documents(prefix)] == expected
    assert load_tokens(prefix).tolist() == [t for doc in expected for t in doc]
    assert [tok.decode(d) for d in load_documents(prefix)] == list(TEXTS.values())


def test_empty_files_are_skipped_with_a_warning(corpus, tmp_path):
    empty = tmp_path / "in" / "empty.txt"
    empty.write_text("")
    with pytest.warns(UserWarning, match="empty"):
        summary = prepare_dataset([corpus[0], empty, corpus[1]], tmp_path / "ds")
    assert summary.documents == 2
    assert summary.skipped_empty == (str(empty),)


def test_token_windows_are_deterministic(corpus, tmp_path):
    prefix = tmp_path / "ds"
    prepare_dataset(corpus, prefix)
    stream = load_tokens(prefix)
    windows = TokenWindows(prefix, batch_size=3, seq_length=8, seed=7)
    gc.collect()  # the mmap view must survive collection (Megatron closes it in __del__)
    b0 = windows.batch(0)
    assert tuple(b0.shape) == (3, 9)
    assert str(b0.dtype) == "torch.int64"
    assert np.array_equal(b0.numpy(), TokenWindows(prefix, 3, 8, seed=7).batch(0).numpy())
    assert not np.array_equal(b0.numpy(), TokenWindows(prefix, 3, 8, seed=8).batch(0).numpy())
    it = iter(windows)
    assert np.array_equal(next(it).numpy(), b0.numpy())
    assert np.array_equal(next(it).numpy(), windows.batch(1).numpy())
    resumed = next(data.token_windows(prefix, 3, 8, seed=7, start=5))
    assert np.array_equal(resumed.numpy(), windows.batch(5).numpy())
    text = stream.tolist()
    for row in b0.tolist():  # every window is a contiguous slice of the stream
        assert any(text[i : i + 9] == row for i in range(len(text) - 8))
    with pytest.raises(DataError, match="fewer than one window"):
        TokenWindows(prefix, 1, len(stream))


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare_dataset([tmp_path / "nope.txt"], tmp_path / "ds")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        prepare_dataset([tmp_path], tmp_path / "ds")


def test_no_files_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="no input files"):
        prepare_dataset([], tmp_path / "ds")
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        prepare_dataset([empty], tmp_path / "ds")
    assert not (tmp_path / "ds.bin").exists()


def test_non_utf8_names_the_file(corpus, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8.*0xe9 at offset 3"):
        prepare_dataset([corpus[0], bad], tmp_path / "ds")
    assert not list(tmp_path.glob("ds*"))  # nothing written


def test_output_parent_is_a_file(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"not a directory|cannot create"):
        prepare_dataset(corpus, blocker / "ds")


def test_output_folder_not_writable(corpus, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see what a user would
        monkeypatch.setattr(data.os, "access", lambda path, mode: Path(path) != locked)
    try:
        with pytest.raises(DataError, match=r"output folder .*locked is not writable"):
            prepare_dataset(corpus, locked / "ds")
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_output_folder_not_creatable(corpus):
    """/proc refuses new folders even to root."""
    with pytest.raises(DataError, match=r"cannot create output folder|not writable"):
        prepare_dataset(corpus, Path("/proc/megacpp-no/ds"))


def test_open_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="no indexed dataset"):
        open_dataset(tmp_path / "nothing")


# --------------------------------------------------------------------------- embedded


def test_embedded_corpus_is_this_repository_only():
    files = embedded_corpus_files()
    rel = [f.relative_to(REPO_ROOT).as_posix() for f in files]
    assert "README.md" in rel
    assert "megacpp_mcore/train/data.py" in rel
    assert "patterns/nam56r.yaml" in rel
    assert all(f.is_file() and f.stat().st_size >= 0 for f in files)
    for r in rel:
        assert r == "README.md" or r.split("/")[0] in {
            "megacpp_mcore",
            "patterns",
            "recipes",
        }, r
        assert ".venv" not in r and "site-packages" not in r and "__pycache__" not in r
    assert len(set(rel)) == len(rel)
    assert files == embedded_corpus_files()  # deterministic order


def test_the_tests_train_on_the_frozen_corpus_and_megatron_can_split_it(frozen_corpus):
    """The suite's training corpus is tests/assets/corpus (fixed text, not the package's live
    source: tests/conftest.py), one document per file; the recipe's default split leaves the
    validation split at least one document, as Megatron splits it (an empty split loops
    forever in Megatron-Core's GPTDataset._get_num_epochs)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from megacpp_mcore.settings.recipe import load_recipe
    from megacpp_mcore.train import cpu_loop

    summary = read_summary(frozen_corpus)
    assert all(f.startswith("tests/assets/corpus/") for f in summary.files)
    assert summary.documents == len(summary.files) >= 50 and 150_000 < summary.bytes < 400_000
    recipe = load_recipe("tiny")
    assert recipe.data.source == "embedded" and cpu_loop.token_source(recipe) == frozen_corpus
    n = summary.documents
    for begin, end in convert_split_vector_to_split_matrix(
            parse_and_normalize_split(recipe.data.split))[:2]:  # as BlendedMegatronDataset
        assert round(end * n) - round(begin * n) >= 1


def test_prepare_embedded_caches(tmp_path, monkeypatch):
    prefix = prepare_embedded(tmp_path)
    assert prefix.parent.parent == tmp_path
    assert prefix.parent.name.startswith("embedded_")
    summary = read_summary(prefix)
    assert summary.documents > 5 and summary.tokens > 10_000
    assert summary.content_hash.startswith(prefix.parent.name.removeprefix("embedded_"))
    assert set(summary.files) == {
        f.relative_to(REPO_ROOT).as_posix() for f in embedded_corpus_files() if f.stat().st_size
    }

    def refuse(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(data, "prepare_dataset", refuse)
    assert prepare_embedded(tmp_path) == prefix  # reused, nothing rewritten
    monkeypatch.undo()

    manifest = Path(f"{prefix}.json")  # a stale manifest (other content) is rebuilt
    stale = json.loads(manifest.read_text())
    stale["content_hash"] = "0" * 64
    manifest.write_text(json.dumps(stale))
    assert prepare_embedded(tmp_path) == prefix
    assert read_summary(prefix).content_hash == summary.content_hash


# --------------------------------------------------------------------------- command line


def test_cli_prepare_walks_directories(corpus, tmp_path, capsys):
    (tmp_path / "in" / "skip.bin").write_bytes(b"\xff\xfe")  # not a text suffix: ignored
    hidden = tmp_path / "in" / ".hidden"
    hidden.mkdir()
    (hidden / "x.txt").write_text("hidden")
    prefix = tmp_path / "cli" / "ds"
    assert main(["data", "prepare", str(tmp_path / "in"), "-o", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert "documents 3" in out and "uint16" in out and "NullTokenizer" in out
    assert len(load_documents(prefix)) == 3
    assert collect_files([tmp_path / "in"]) == sorted(corpus)

    assert main(["data", "prepare", str(corpus[0]), "-o", str(prefix), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 1


def test_cli_embedded_into_cache(tmp_path, capsys):
    assert main(["data", "prepare", "--embedded", "--cache-dir", str(tmp_path)]) == 0
    assert "embedded_" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "prepare"], "nothing to prepare"),
        (["data", "prepare", "missing-dir-xyz", "-o", "x"], "input not found"),
        (["data", "prepare", "{tmp}"], "-o/--output PREFIX is required"),
    ],
)
def test_cli_errors_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "megacpp data: error:" in err and message in err


def test_cli_empty_directory(tmp_path, capsys):
    assert main(["data", "prepare", str(tmp_path), "-o", str(tmp_path / "ds")]) == 2
    assert "empty corpus" in capsys.readouterr().err


def test_recipe_byte_vocab_agrees():
    """recipe.py keeps its own copy of the byte vocabulary size (to stay import-light)."""
    recipe = pytest.importorskip("megacpp_mcore.settings.rules")
    assert recipe.BYTE_VOCAB_SIZE == VOCAB_SIZE
