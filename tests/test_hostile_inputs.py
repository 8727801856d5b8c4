"""Hostile inputs fail closed: every door answers with the project's own error (exit 2 from
the CLI, no traceback), in bounded time and memory. Recipes, receipts and the train command."""

import subprocess
import sys
import time

import pytest

from megacpp_mcore.errors import RecipeError
from megacpp_mcore.settings.recipe import (
    MAX_RECIPE_BYTES,
    MAX_YAML_DEPTH,
    load_recipe,
    parse_override,
)
from tests.test_recipe import BASE


def cli(*args, timeout=120):
    """``megacpp ARGS`` in a subprocess (exit status and output as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "megacpp_mcore.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def assert_clean_refusal(result, needle):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert needle in result.stderr, result.stderr


# --------------------------------------------------------------------------- recipes

#: eight lines whose aliases expand to 9**8 (43 million) strings in whatever walks them.
ALIAS_BOMB = "pattern: AEM\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefg", "bcdefgh", strict=True)
).replace("b: &b [*a", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a", 1) + "description: *h\n"


@pytest.mark.parametrize(("content", "needle"), [
    (b"\xff\xfe\x00\x01binary", "not a UTF-8 text file (byte 0xff at offset 0)"),
    (b"pattern: AEM\x00\n", "not valid YAML"),
    (("[" * 10_000 + "]" * 10_000).encode(), f"nested deeper than {MAX_YAML_DEPTH} levels"),
    (("".join("  " * i + f"k{i}:\n" for i in range(500)) + "  " * 500 + "x\n").encode(),
     f"nested deeper than {MAX_YAML_DEPTH} levels"),
    (ALIAS_BOMB.encode(), "aliases are not accepted in recipes"),
    (b"pattern: AEM\npattern: AEM\n", "duplicate key 'pattern'"),
    (b"? [a, b]\n: 1\n", "a mapping key must be a plain name"),
    (b"pattern: AEM\n" + b"#" * (MAX_RECIPE_BYTES + 1), "too large for a recipe"),
])
def test_hostile_recipe_files(tmp_path, content, needle):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    started = time.perf_counter()
    with pytest.raises(RecipeError, match=r"r\.yaml") as info:
        load_recipe(path)
    assert needle in str(info.value)
    assert time.perf_counter() - started < 5, "a hostile recipe must fail fast"


def test_hostile_recipe_through_the_cli(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert_clean_refusal(cli("recipe", "show", path), "aliases are not accepted")
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert_clean_refusal(cli("recipe", "show", path), "not a UTF-8 text file")


def test_hostile_base_file_names_the_base(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xc3\x28")
    path = tmp_path / "r.yaml"
    path.write_text("base: bin.yaml\n" + BASE)
    with pytest.raises(RecipeError, match=r"bin.yaml: not a UTF-8 text file"):
        load_recipe(path)


def test_hostile_overrides():
    with pytest.raises(RecipeError, match="aliases are not accepted"):
        parse_override("model.hidden_size=*a")
    with pytest.raises(RecipeError, match="nested deeper"):
        parse_override("description=" + "[" * 5000)
    with pytest.raises(RecipeError, match="duplicate key"):
        parse_override("model={a: 1, a: 2}")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_recipe(path).pattern == "AEMFRA"


def test_a_recipe_folder_is_not_a_file(tmp_path):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(RecipeError):
        load_recipe(folder)
