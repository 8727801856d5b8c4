"""Hostile inputs fail closed: every door answers with the project's own error (exit 2 from
the CLI, no traceback), in bounded time and memory. Recipes, receipts and the train command."""

import json
import os
import subprocess
import sys
import time

import pytest

from megacpp_mcore.errors import ReceiptError, RecipeError
from megacpp_mcore.settings.overrides import parse_override
from megacpp_mcore.settings.recipe import load_recipe
from megacpp_mcore.settings.yaml_text import MAX_RECIPE_BYTES, MAX_YAML_DEPTH
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


# --------------------------------------------------------------------------- receipts


def good_receipt(tmp_path, name="good.json"):
    from megacpp_mcore.receipt import Receipt

    r = Receipt.create(tmp_path / name, run_id=name, recipe_name="tiny", recipe_hash="ab" * 32,
                       layout="AEMFRA", versions={"torch": "2"}, parallel={"tensor": 1})
    r.add_feature("stp", 10, {"weight": 0.1})
    for step in (10, 20, 30):
        r.log_interval(step, loss=3.0 / step, aux_losses={"load_balancing": 0.1}, lr=1e-3,
                       tokens_per_s=1000.0, mfu=0.3, peak_memory_bytes=2**30,
                       goodput={"compute": 1.0, "data_wait": 0.5})
    r.finish()
    return r.path


def _set(data, path, value):
    *parents, last = path
    for key in parents:
        data = data[key]
    if value is _DELETE:
        del data[last]
    else:
        data[last] = value


_DELETE = object()
#: (JSON path, bad value, what the error must name)
MALFORMED = [
    (("intervals", 1, "loss"), "low", "intervals[1].loss: expected a number"),
    (("intervals", 0, "step"), "10", "intervals[0].step: expected an integer"),
    (("intervals", 0, "step"), True, "intervals[0].step: expected an integer"),
    (("intervals", 2, "aux_losses"), [0.1], "intervals[2].aux_losses: expected an object"),
    (("intervals", 2, "aux_losses", "load_balancing"), {}, "aux_losses.load_balancing"),
    (("intervals", 0, "goodput", "buckets", "compute"), "1s", "goodput.buckets.compute"),
    (("intervals", 0, "goodput"), 5, "intervals[0].goodput: expected an object"),
    (("intervals", 0, "warmup"), "yes", "intervals[0].warmup: expected true or false"),
    (("intervals", 1), [], "intervals[1]: expected an object"),
    (("pattern", "roles", 2), "M", "pattern.roles[2]: expected an object"),
    (("pattern", "roles", 3, "letter"), _DELETE, "pattern.roles[3].letter"),
    (("pattern", "depth"), "six", "pattern.depth: expected an integer"),
    (("recipe", "hash"), 12345, "recipe.hash: expected a string"),
    (("run", "status"), None, "run.status: expected a string"),
    (("run", "command_line"), "megacpp train", "run.command_line: expected a list"),
    (("features", 0), "stp", "features[0]: expected an object"),
    (("features", 0, "settings"), [1], "features[0].settings: expected an object"),
    (("warmup_intervals",), "1", "warmup_intervals: expected an integer"),
    (("warmup_intervals",), -1, "warmup_intervals: must be >= 0"),
    (("events",), {}, "events: expected a list"),
    (("events",), None, "events: expected a list"),
    (("warmup_intervals",), None, "warmup_intervals: expected an integer"),
    (("pattern", "roles"), None, "pattern.roles: expected a list"),
    (("intervals", 2, "goodput", "buckets"), None, "goodput.buckets: expected an object"),
    (("notes",), [], "notes: expected an object"),
]


@pytest.mark.parametrize(("path", "value", "needle"), MALFORMED)
@pytest.mark.parametrize("action", ["show", "compare", "plot"])
def test_malformed_receipts_exit_2_naming_the_field(tmp_path, capsys, path, value, needle,
                                                    action):
    from megacpp_mcore.cli.main import main

    good = good_receipt(tmp_path)
    data = json.loads(good.read_text())
    _set(data, path, value)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    argv = {"show": ["show", bad], "compare": ["compare", good, bad],
            "plot": ["plot", good, bad, "-o", tmp_path / "p.png"]}[action]
    assert main(["receipt", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "bad.json" in err, err


@pytest.mark.parametrize(("text", "needle"), [
    ('{"kind": "megacpp-receipt", "schema_version": 1, "x": ' + "9" * 5000 + "}",
     "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
])
def test_receipts_json_that_python_cannot_read(tmp_path, text, needle):
    from megacpp_mcore.receipt import load_receipt

    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(ReceiptError, match=needle):
        load_receipt(path)


def test_deeply_nested_free_form_settings_are_refused(tmp_path):
    from megacpp_mcore.receipt import load_receipt

    path = good_receipt(tmp_path)
    data = json.loads(path.read_text())
    deep: dict = {}
    data["features"][0]["settings"] = deep
    for _ in range(200):
        deep["x"] = {}
        deep = deep["x"]
    path.write_text(json.dumps(data))
    with pytest.raises(ReceiptError, match="nested deeper than 64 levels"):
        load_receipt(path)


def test_odd_but_valid_values_show_and_compare(tmp_path, capsys):
    """Huge, tiny, negative and non-finite numbers are valid receipt values: show and compare
    print them; plot draws what it can or refuses with the project's error."""
    from megacpp_mcore.cli.main import main

    path = good_receipt(tmp_path)
    data = json.loads(path.read_text())
    for iv, value in zip(data["intervals"], [10**400, -1e308, "nan"], strict=True):
        iv.update(loss=value, tokens_per_s=value, mfu=value, peak_memory_bytes=value)
    path.write_text(json.dumps(data))
    assert main(["receipt", "show", str(path)]) == 0
    assert main(["receipt", "compare", str(path), str(path)]) == 0
    assert "inf" in capsys.readouterr().out
    assert main(["receipt", "plot", str(path), "-o", str(tmp_path / "p.png")]) in (0, 2)


def test_malformed_receipt_through_the_cli(tmp_path):
    good = good_receipt(tmp_path)
    data = json.loads(good.read_text())
    data["intervals"][1]["loss"] = "low"
    good.write_text(json.dumps(data))
    assert_clean_refusal(cli("receipt", "show", good), "intervals[1].loss")


# --------------------------------------------------------------------------- the train command

#: a CPU run that reaches its first receipt interval within a few seconds
QUICK = ["--set", "model.seq_length=32", "--set", "training.micro_batch_size=2",
         "--set", "training.global_batch_size=2", "--set", "training.log_interval=1",
         "--set", "training.lr_warmup_iters=1", "--set", "data.source=mock"]


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_train_iters_must_be_positive(capsys, value):
    from megacpp_mcore.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["train", "tiny", "--device", "cpu", "--train-iters", value])
    assert info.value.code == 2
    assert "--train-iters" in capsys.readouterr().err


def test_train_on_cpu_refuses_zero_steps():
    from megacpp_mcore.settings.recipe import load_recipe
    from megacpp_mcore.train.cpu_loop import train_on_cpu

    with pytest.raises(RecipeError, match="train_iters must be a positive integer, got 0"):
        train_on_cpu(load_recipe("tiny"), train_iters=0, print_fn=None)


def test_device_gpu_without_cuda_exits_2(capsys, monkeypatch):
    import torch

    from megacpp_mcore.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "tiny", "--device", "gpu"]) == 2
    assert "--device gpu: torch sees no CUDA GPU" in capsys.readouterr().err


def test_receipt_folder_with_slash_is_written_into(tmp_path, capsys):
    from megacpp_mcore.cli.main import main
    from megacpp_mcore.receipt import load_receipt

    folder = tmp_path / "runs" / "mine"
    assert main(["train", "tiny", "--device", "cpu", "--train-iters", "2", *QUICK,
                 "--receipt", f"{folder}/"]) == 0
    written = list(folder.glob("*.json"))
    assert folder.is_dir() and len(written) == 1, list(tmp_path.rglob("*"))
    assert load_receipt(written[0]).data["run"]["status"] == "completed"
    # an existing folder without the slash is a folder too
    assert main(["train", "tiny", "--device", "cpu", "--train-iters", "2", *QUICK,
                 "--receipt", str(folder)]) == 0
    assert len(list(folder.glob("*.json"))) == 2
    capsys.readouterr()
    afile = tmp_path / "a.json"
    afile.write_text("{}")
    assert main(["train", "tiny", "--device", "cpu", "--receipt", f"{afile}/"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["train", "tiny", "--device", "cpu", "--receipt", f"{afile}/x.json"]) == 2


def lone_process_env() -> dict[str, str]:
    """This environment minus the rendezvous variables an in-process test run may have set
    (a child reusing MASTER_PORT would collide with this process's gloo store)."""
    rendezvous = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in rendezvous}


def _wait_for_interval(folder, proc, timeout=300):
    from megacpp_mcore.receipt import load_receipt

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for path in folder.glob("*.json"):
            try:
                if load_receipt(path).intervals:
                    return path
            except ReceiptError:
                pass
        time.sleep(0.2)
    raise AssertionError("no receipt interval appeared")


@pytest.mark.parametrize(("sig", "code", "status"), [
    ("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_signals_end_the_run_cleanly(tmp_path, sig, code, status):
    """A real CPU training run, stopped once its first receipt interval is on disk."""
    import signal

    from megacpp_mcore.receipt import load_receipt

    folder = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "megacpp_mcore.cli.main", "train", "tiny", "--device", "cpu",
         "--train-iters", "100000", *QUICK, "--receipt", f"{folder}/"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lone_process_env())
    try:
        path = _wait_for_interval(folder, proc)
        proc.send_signal(getattr(signal, sig))
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert f"megacpp train: {status}" in err
    data = load_receipt(path).data
    assert data["run"]["status"] == status and data["run"]["end_time"]
