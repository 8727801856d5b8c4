"""Fuzz every input door for N generated cases (default 10,000) and count tracebacks.

Runs the properties of ``tests/fuzz_cases.py`` (the same ones ``tests/test_fuzz.py`` runs a few
hundred cases of in CI): every recipe file, ``--set`` override, pattern and receipt either
works or raises the project's own error. Prints one line per property and a summary line
``N cases, K tracebacks``; each failure is printed with hypothesis's falsifying example.
Exit status 0 when there were no tracebacks, 1 otherwise.

    .venv/bin/python scripts/fuzz.py            # 10,000 cases, split over the properties
    .venv/bin/python scripts/fuzz.py -n 500 --only pattern receipt_mutation
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz_cases import PROPERTIES, property_test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--cases", type=int, default=10_000,
                        help="generated cases in all, split evenly over the properties")
    parser.add_argument("--only", nargs="+", choices=sorted(PROPERTIES), default=None,
                        help="run only these properties")
    args = parser.parse_args(argv)
    names = args.only or sorted(PROPERTIES)
    share, extra = divmod(max(args.cases, len(names)), len(names))
    total, failures = 0, []
    with tempfile.TemporaryDirectory(prefix="megacpp-fuzz-") as folder:
        for i, name in enumerate(names):
            per_property = share + (i < extra)
            counter = [0]
            started = time.perf_counter()
            try:
                property_test(name, Path(folder), per_property, counter)()
                verdict = "ok"
            except Exception as err:  # a traceback: what the fuzzing is looking for
                failures.append((name, err))
                verdict = f"TRACEBACK {type(err).__name__}"
            total += counter[0]
            print(f"{name:<18} {counter[0]:>6} cases  {time.perf_counter() - started:6.1f}s  "
                  f"{verdict}", flush=True)
    for name, err in failures:
        print(f"\n=== {name}: {type(err).__name__}: {err}")
        for note in getattr(err, "__notes__", []):
            print(note)
        print("".join(traceback.format_exception(err)[-12:]), end="")
    print(f"{total} cases, {len(failures)} tracebacks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
