"""Every recipe string that reaches shell output is quoted or escaped: hostile strings in a
recipe's file name, description and --set overrides leave the launch script valid bash that
runs nothing but the launcher, with the values intact."""

import json
import os
import shutil
import subprocess

import pytest
import yaml

from megacpp_mcore.cli.main import main
from megacpp_mcore.megatron.translate import shell_comment, translate
from megacpp_mcore.paths import RECIPES_DIR
from megacpp_mcore.settings.recipe import load_recipe

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

#: each would run `touch pwned` if it reached the script unquoted
HOSTILE = [
    "line one\ntouch pwned",
    "$(touch pwned)",
    "`touch pwned`",
    "it's \"quoted\" $(touch pwned)",
    "x\r\n; touch pwned #",
    "x\u2028touch pwned\x1b[2K",
]


def _fake_torchrun(tmp_path):
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@"\n')
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}


@pytest.mark.parametrize("evil", HOSTILE)
def test_hostile_recipe_strings_run_nothing(tmp_path, capsys, evil):
    data = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    data["description"] = evil
    recipe_file = tmp_path / f"evil {evil.replace('/', '_')}.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    overrides = [f"logging.tensorboard_dir={json.dumps(evil)}",
                 f"logging.receipt_dir={json.dumps(evil)}",
                 f"description={evil}", f"data.split=98,2,0 #{evil}"]  # raw: may not load
    overrides = [o for o in overrides if _loads(recipe_file, o)]
    assert len(overrides) >= 2
    argv = ["translate", str(recipe_file), "--target", "plugin", "--format", "shell"]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 0
    script = capsys.readouterr().out
    path = tmp_path / "launch.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)

    head = script.split("set -euo pipefail\n")[0].splitlines()
    assert head[0] == "#!/usr/bin/env bash" and all(x.startswith("# ") for x in head[1:])
    out = subprocess.run(["bash", str(path)], check=True, capture_output=True, cwd=tmp_path,
                         env=_fake_torchrun(tmp_path)).stdout
    assert not (tmp_path / "pwned").exists()
    plan = translate(load_recipe(recipe_file, overrides), "plugin")
    received = out.decode().split("\0")[:-1]
    assert received[3:] == plan.argv()  # after --nproc-per-node N LAUNCHER, values intact


def _loads(recipe_file, override):
    from megacpp_mcore.errors import RecipeError

    try:
        load_recipe(recipe_file, [override])
    except RecipeError:
        return False
    return True


@pytest.mark.parametrize("evil", HOSTILE)
def test_args_line_is_one_quoted_line(tmp_path, evil):
    plan = translate(load_recipe("tiny", [f"logging.tensorboard_dir={json.dumps(evil)}"]),
                     "plugin")
    assert plan.recipe.logging.tensorboard_dir == evil
    line = plan.args_line()
    out = subprocess.run(["bash", "-c", f'printf "%s\\0" {line}'], check=True,
                         capture_output=True, cwd=tmp_path).stdout
    assert out.decode().split("\0")[:-1] == plan.argv()
    assert not (tmp_path / "pwned").exists()


def test_shell_comment_escapes_what_would_end_the_line():
    assert shell_comment("a\nb\rc\u2028d\x1be") == "# a\\nb\\rc\\u2028d\\x1be"
    assert shell_comment("plain text, $(kept) `as` 'is'") == "# plain text, $(kept) `as` 'is'"
