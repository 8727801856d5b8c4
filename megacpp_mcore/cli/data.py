"""``megacpp data prepare``: the command line of :mod:`megacpp_mcore.train.data`."""

from __future__ import annotations

import json
from pathlib import Path

from megacpp_mcore.errors import DataError
from megacpp_mcore.train.data import (
    DEFAULT_DATA_DIR,
    EOD_ID,
    TEXT_SUFFIXES,
    VOCAB_SIZE,
    ByteTokenizer,
    collect_files,
    embedded_corpus_files,
    prepare_dataset,
    prepare_embedded,
    read_summary,
)


def _cmd_data_prepare(args) -> int:
    inputs = list(args.inputs)
    if not inputs and not args.embedded:
        raise DataError("nothing to prepare: give text files or directories, or --embedded")
    if args.embedded and not inputs and args.output is None:
        prefix = prepare_embedded(args.cache_dir)
        summary = read_summary(prefix)
    else:
        if args.output is None:
            raise DataError("-o/--output PREFIX is required (PREFIX.bin and PREFIX.idx)")
        files = (embedded_corpus_files() if args.embedded else []) + collect_files(inputs)
        if not files:
            raise DataError(
                f"empty corpus: no {', '.join(TEXT_SUFFIXES)} files under "
                + ", ".join(map(str, inputs))
            )
        summary = prepare_dataset(files, args.output)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(summary)
        print(
            "megatron  --data-path "
            + summary.prefix
            + " "
            + " ".join(ByteTokenizer.megatron_args())
        )
    return 0


def add_data_subcommand(sub) -> None:
    """Register ``megacpp data prepare`` (called from cli.SUBCOMMANDS)."""
    p = sub.add_parser(
        "data",
        help="prepare training data (byte tokenizer, Megatron indexed datasets)",
        description="Training data tools. Text is tokenized as UTF-8 bytes (ids 0-255) with "
        f"an end-of-document token {EOD_ID} (vocabulary {VOCAB_SIZE}; Megatron: "
        + " ".join(ByteTokenizer.megatron_args())
        + ").",
    )
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="write text files as a Megatron indexed dataset (PREFIX.bin/.idx)",
        description="Tokenize text files (one document per file, each ending in EOD) into a "
        "Megatron indexed dataset written with Megatron's IndexedDatasetBuilder, plus a "
        "PREFIX.json summary. Directories are walked for "
        + ", ".join(TEXT_SUFFIXES)
        + " (hidden folders skipped). --embedded adds this project's own sources and README; "
        "with --embedded alone (no -o) the corpus is prepared once into "
        "runs/data/embedded_<hash>/ and reused while its content hash matches. Bad input "
        "(missing or non-UTF-8 files, an empty corpus, an unwritable folder) exits 2.",
    )
    prep.add_argument("inputs", nargs="*", metavar="FILE_OR_DIR", help="text files or folders")
    prep.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="PREFIX",
        help="output prefix: writes PREFIX.bin, PREFIX.idx and PREFIX.json",
    )
    prep.add_argument(
        "--embedded",
        action="store_true",
        help="include the embedded corpus (this project's README, sources, patterns, recipes)",
    )
    prep.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"cache folder for --embedded without -o (default {DEFAULT_DATA_DIR})",
    )
    prep.add_argument("--json", action="store_true", help="print the summary as JSON")
    prep.set_defaults(handler=_cmd_data_prepare)
