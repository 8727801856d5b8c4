"""The layout contract: parsing, tiling, stages, MTP, families and fail-closed errors."""

import contextlib
import json
import string
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacpp_mcore.errors import PatternError
from megacpp_mcore.layout import (
    FAMILIES,
    known_families,
    load_family,
    parse_pattern,
    resolve,
)

LETTERS = "".join(FAMILIES)


def test_nam56r_tiles_to_52_layers():
    layout = parse_pattern("AEMEAEMEAEMR", 52)
    assert layout.depth == 52
    assert layout.counts == {"A": 13, "E": 22, "M": 13, "F": 0, "R": 4, "G": 0}
    assert layout.positions("R") == (12, 24, 36, 48)
    assert layout.letters.endswith("AEMRAEME")
    assert layout.stages == (layout.letters,)
    assert layout.mtp == ()


def test_named_family_matches_literal():
    assert load_family("nam56r").layout() == parse_pattern("AEMEAEMEAEMR", 52)
    assert resolve("nam56r") == parse_pattern("AEMEAEMEAEMR", 52)


def test_nam52_is_nemotron_h_8b():
    megatron = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    layout = load_family("nam52").layout()
    assert layout.letters == megatron.replace("*", "A").replace("-", "F")
    assert layout.counts == {"A": 4, "E": 0, "M": 24, "F": 24, "R": 0, "G": 0}


def test_tiny_families_hold_every_letter():
    for name in ("tiny", "tiny_pp"):
        layout = load_family(name).layout()
        assert all(layout.counts[letter] >= 1 for letter in LETTERS), name


def test_every_shipped_family_loads():
    assert {"nam56r", "nam52", "tiny", "tiny_pp"} <= set(known_families())
    for name in known_families():
        load_family(name).layout()


def test_unknown_family_lists_known_ones():
    with pytest.raises(PatternError, match=r"known families: .*nam56r"):
        load_family("nam99")
    with pytest.raises(PatternError, match="known families"):
        resolve("nam99")


def test_stages_and_mtp():
    layout = parse_pattern("AEM|FRG/MA/MA", 6)
    assert layout.stages == ("AEM", "FRG")
    assert [layer.stage for layer in layout.layers] == [0, 0, 0, 1, 1, 1]
    assert layout.mtp == ("MA", "MA")
    assert layout.mtp_depth == 2
    assert [(x.mtp_part, x.letter, x.stage) for x in layout.mtp_layers] == [
        (1, "M", 1),
        (1, "A", 1),
        (2, "M", 1),
        (2, "A", 1),
    ]
    assert layout.canonical == "AEM|FRG/MA/MA"
    assert layout.layers[3].family == "mlp" and layout.layers[3].number == 4


def test_depth_may_be_omitted():
    assert parse_pattern("AEMR").depth == 4
    assert parse_pattern("AE|MR").depth == 4


def _error(pattern, depth=None) -> str:
    with pytest.raises(PatternError) as info:
        parse_pattern(pattern, depth)
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize(
    ("pattern", "depth", "needle", "caret_column"),
    [
        ("", None, "empty pattern", None),
        ("AEXM", None, "unknown letter 'X' at column 3", 2),
        ("AeM", None, "lowercase letter 'e' at column 2", 1),
        ("AE M", None, "whitespace", 2),
        ("AE||M", None, "empty pipeline stage", None),
        ("|AEM", None, "empty pipeline stage (first)", 0),
        ("AEM|", None, "empty pipeline stage (last)", None),
        ("AE|MR", 6, "add up to the depth exactly", None),
        ("AEM", 0, "positive integer", None),
        ("AEM", -3, "positive integer", None),
        ("AEM/MA/AM", None, "MTP part 2 ('AM') differs", 7),
        ("/MA", None, "without a main pattern", 0),
        ("AEM//MA", None, "MTP part 1 is empty", None),
        ("AEM/M|A", None, "MTP part 1 contains '|'", 5),
        ("AEMR", 2, "shorter than the pattern", 2),
    ],
)
def test_bad_patterns_fail_closed(pattern, depth, needle, caret_column):
    message = _error(pattern, depth)
    assert needle in message
    assert "accepted:" in message or "positive integer" in message
    if caret_column is not None:
        lines = message.splitlines()
        assert lines[1] == f"  {pattern}"
        assert lines[2] == "  " + " " * caret_column + "^"


def test_depth_must_be_an_int():
    assert "positive integer" in _error("AEM", True)
    assert "positive integer" in _error("AEM", 2.0)


def test_not_a_string():
    with pytest.raises(PatternError):
        parse_pattern(None)


# --------------------------------------------------------------------------- properties

main_parts = st.lists(st.text(alphabet=LETTERS, min_size=1, max_size=8), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(stages=main_parts, mtp=st.text(alphabet=LETTERS, max_size=4), mtp_depth=st.integers(0, 3))
def test_valid_patterns_round_trip(stages, mtp, mtp_depth):
    mtp_parts = [mtp] * mtp_depth if mtp else []
    pattern = "/".join(["|".join(stages), *mtp_parts])
    layout = parse_pattern(pattern)
    assert layout.stages == tuple(stages)
    assert layout.mtp == tuple(mtp_parts)
    assert layout.depth == sum(map(len, stages))
    assert parse_pattern(layout.canonical) == layout
    assert parse_pattern(layout.canonical, layout.depth) == layout
    assert sum(layout.counts.values()) == layout.depth


@settings(max_examples=200, deadline=None)
@given(tile=st.text(alphabet=LETTERS, min_size=1, max_size=12), extra=st.integers(0, 40))
def test_tiling(tile, extra):
    depth = len(tile) + extra
    layout = parse_pattern(tile, depth)
    assert layout.depth == depth
    for layer in layout.layers:
        assert layer.letter == tile[layer.index % len(tile)]
        assert layer.stage == 0
    assert parse_pattern(layout.canonical) == layout


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(alphabet=LETTERS + "|/ aexZ*-\t", max_size=20),
    depth=st.one_of(st.none(), st.integers(-3, 60)),
)
def test_random_strings_raise_only_pattern_error(text, depth):
    try:
        layout = parse_pattern(text, depth)
    except PatternError:
        return
    assert set(layout.letters) <= set(LETTERS)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=string.printable, max_size=16))
def test_any_printable_string(text):
    with contextlib.suppress(PatternError):
        parse_pattern(text)


# --------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "megacpp_mcore.cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_json_nam56r():
    result = _cli("pattern", "nam56r", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["counts"]["A"] == 13 and data["counts"]["E"] == 22
    assert data["counts"]["M"] == 13 and data["counts"]["R"] == 4
    assert len(data["layers"]) == 52 and data["layers"][11] == "R"
    assert data["stages"] == ["".join(data["layers"])]
    assert data["mtp"] == []


def test_cli_table_and_error():
    result = _cli("pattern", "AE|MR/F", "--depth", "4")
    assert result.returncode == 0, result.stderr
    assert "counts: 1 A, 1 E, 1 M, 1 R" in result.stdout
    bad = _cli("pattern", "AEQ")
    assert bad.returncode == 2
    assert "unknown letter 'Q'" in bad.stderr and "^" in bad.stderr
    assert bad.stdout == ""


def test_cli_help():
    top = _cli("--help")
    assert top.returncode == 0 and "pattern" in top.stdout
    sub = _cli("pattern", "--help")
    assert sub.returncode == 0 and "--depth" in sub.stdout


# --------------------------------------------------------------------------- size limits


def test_depth_beyond_the_maximum_fails_fast():
    from megacpp_mcore.layout import MAX_LAYERS

    assert parse_pattern("AEM", MAX_LAYERS).depth == MAX_LAYERS
    for depth in (MAX_LAYERS + 1, 10**12):
        with pytest.raises(PatternError, match=f"maximum of {MAX_LAYERS} layers"):
            parse_pattern("AEM", depth)


def test_overlong_literal_patterns_are_refused():
    from megacpp_mcore.layout import MAX_LAYERS, MAX_PATTERN_CHARS

    with pytest.raises(PatternError, match="main decoder plus MTP"):
        parse_pattern("A" * (MAX_LAYERS - 1) + "/AA")
    with pytest.raises(PatternError, match=f"maximum of {MAX_PATTERN_CHARS}"):
        parse_pattern("A" * (MAX_PATTERN_CHARS + 1))
    with pytest.raises(PatternError, match="main decoder plus MTP"):
        parse_pattern("|".join(["AE"] * (MAX_LAYERS // 2 + 1)))


def test_cli_refuses_a_huge_depth_with_exit_2():
    result = _cli("pattern", "AEM", "--depth", "1000000000000")
    assert result.returncode == 2
    assert "maximum of 4096 layers" in result.stderr and "Traceback" not in result.stderr
