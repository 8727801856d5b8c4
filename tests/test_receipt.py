"""Receipts: schema, atomic updates, finish/guard, load errors, show, compare, plot."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megacpp_mcore import jsonio as rmod
from megacpp_mcore.cli.main import main
from megacpp_mcore.errors import ReceiptError
from megacpp_mcore.layout import parse_pattern
from megacpp_mcore.receipt.analysis import (
    compare_receipts,
    format_comparison,
    format_receipt,
    plot_receipts,
)
from megacpp_mcore.receipt.writer import (
    SCHEMA_VERSION,
    Goodput,
    Receipt,
    collect_versions,
    load_receipt,
)
from megacpp_mcore.settings.config import ParallelConfig

VERSIONS = {"python": "3.12.0", "torch": "2.14.1", "megatron_core": "0.19.2", "mamba_ssm": None}


def strict_load(path: Path):
    """json.loads that refuses NaN/Infinity (what jq or a browser would accept)."""

    def refuse(const):
        raise ValueError(f"non-strict JSON constant {const}")

    return json.loads(path.read_text(), parse_constant=refuse)


def make(tmp_path: Path, name: str = "run", **kwargs) -> Receipt:
    kwargs.setdefault("versions", VERSIONS)
    return Receipt.create(
        tmp_path / f"{name}.json",
        run_id=name,
        recipe_name="tiny",
        recipe_hash=rmod.content_hash({"model": {"hidden_size": 64}}),
        layout=parse_pattern("AEMR/AF/AF", 4),
        backends={"mamba": {"requested": "auto", "observed": "reference"}},
        parallel=ParallelConfig(tensor=1),
        command_line=["megacpp", "train", "tiny"],
        **kwargs,
    )


def synthetic_run(tmp_path, name, steps, warmup_intervals=1, loss0=5.0, tps=1000.0, skip=()):
    r = make(tmp_path, name, warmup_intervals=warmup_intervals)
    for i, step in enumerate(steps):
        if step in skip:
            continue
        r.log_interval(
            step,
            loss=loss0 - 0.01 * step,
            aux_losses={"moe_load_balancing": 0.1 / (i + 1), "stp": 0.05 + 0.001 * i},
            lr=1e-3,
            tokens_per_s=tps * (0.2 if i == 0 else 1.0),
            tflops_per_gpu=tps / 10,
            mfu=tps / 10 / 989,
            peak_memory_bytes=2**30,
            goodput={"compute": 8.0 * (i + 1), "data_wait": 1.0 * (i + 1), "warmup_compile": 3.0},
        )
    r.finish("completed")
    return r


# --------------------------------------------------------------------------- schema


def test_schema_fields(tmp_path):
    r = make(tmp_path)
    r.add_feature("dash", from_step=100, settings={"alpha": 0.3, "shrink": 0.3})
    r.set_backend("recurrent", requested="triton", observed="reference")
    d = strict_load(r.path)
    assert d["schema_version"] == SCHEMA_VERSION == 1
    assert d["kind"] == "megacpp-receipt"
    assert d["run"]["id"] == "run" and d["run"]["status"] == "running"
    assert d["run"]["start_time"].endswith("Z") and d["run"]["end_time"] is None
    assert d["run"]["command_line"] == ["megacpp", "train", "tiny"]
    assert d["recipe"]["name"] == "tiny" and len(d["recipe"]["hash"]) == 64
    assert d["pattern"]["pattern"] == "AEMR/AF/AF"
    assert d["pattern"]["roles"] == [
        {"number": 1, "letter": "A", "family": "attention"},
        {"number": 2, "letter": "E", "family": "moe"},
        {"number": 3, "letter": "M", "family": "mamba"},
        {"number": 4, "letter": "R", "family": "recurrent"},
    ]
    assert [(m["mtp_part"], m["letter"]) for m in d["pattern"]["mtp_roles"]] == [
        (1, "A"),
        (1, "F"),
        (2, "A"),
        (2, "F"),
    ]
    assert d["backends"] == {
        "mamba": {"requested": "auto", "observed": "reference"},
        "recurrent": {"requested": "triton", "observed": "reference"},
    }
    assert d["parallel"]["tensor"] == 1 and d["parallel"]["fsdp"] == "none"
    assert d["versions"] == VERSIONS
    assert d["features"] == [
        {"name": "dash", "from_step": 100, "settings": {"alpha": 0.3, "shrink": 0.3}}
    ]
    assert d["intervals"] == [] and d["warmup_intervals"] == 1

    clock = iter([0.0, 2.0, 7.0, 10.0]).__next__
    good = Goodput(clock=clock)
    with good.measure("compute"):  # 2.0 -> 7.0
        pass
    good.add("plasticity", 0.5)
    rec = r.log_interval(
        10,
        loss=float("nan"),
        aux_losses={"moe_load_balancing": 0.01},
        lr=3e-4,
        tokens_per_s=1234.5,
        tflops_per_gpu=100.0,
        mfu=0.1,
        peak_memory_bytes=123,
        goodput=good,  # snapshot at t = 10
        consumed_tokens=4096,
    )
    d = strict_load(r.path)
    iv = d["intervals"][0]
    assert iv == rec
    assert iv["loss"] == "nan" and math.isnan(rmod.number(iv["loss"]))
    assert iv["aux_losses"] == {"moe_load_balancing": 0.01}
    assert iv["warmup"] is True  # the first interval (warmup_intervals = 1)
    assert iv["extra"] == {"consumed_tokens": 4096}
    assert iv["goodput"]["buckets"] == {
        "compute": 5.0,
        "data_wait": 0.0,
        "checkpoint": 0.0,
        "warmup_compile": 0.0,
        "plasticity": 0.5,
        "other": 4.5,
    }
    assert iv["goodput"]["total_s"] == 10.0 and iv["goodput"]["fraction"] == 0.5
    assert r.log_interval(20, loss=1.0)["warmup"] is False
    assert r.log_interval(30, loss=1.0, warmup=True)["warmup"] is True  # explicit flag wins
    assert load_receipt(r.path).warmup_flags() == [True, False, True]


def test_collect_versions_never_fails(monkeypatch):
    from importlib import metadata

    real = metadata.version

    def fake(name):
        if name in ("torch",):
            return real(name)
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", fake)
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now raises ImportError
    v = collect_versions()
    assert v["python"] and v["torch"]
    for key in ("megatron_core", "transformer_engine", "mamba_ssm", "triton", "cuda", "gpu_name"):
        assert key in v and v[key] is None
    assert v["gpu_count"] == 0
    json.dumps(v)


def test_collect_versions_real():
    v = collect_versions()
    assert v["megatron_core"].startswith("0.19")
    assert v["torch"]
    json.dumps(v)


# --------------------------------------------------------------------------- atomic writes


def test_failed_write_keeps_previous_receipt(tmp_path, monkeypatch):
    r = make(tmp_path)
    r.log_interval(10, loss=2.0)
    before = r.path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(rmod.os, "replace", crash)
    with pytest.raises(ReceiptError, match="simulated crash"):
        r.log_interval(20, loss=1.5)
    monkeypatch.undo()
    assert r.path.read_bytes() == before
    assert load_receipt(r.path).intervals[-1]["step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no tmp left

    r.log_interval(30, loss=1.0)  # the next write works and carries everything
    assert [iv["step"] for iv in load_receipt(r.path).intervals] == [10, 20, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_killed_writer_leaves_a_valid_receipt(tmp_path):
    """SIGKILL a process that rewrites its receipt in a tight loop: the file stays valid."""
    path = tmp_path / "killed.json"
    script = textwrap.dedent(
        f"""
        import sys
        from megacpp_mcore.receipt import Receipt
        r = Receipt.create({str(path)!r}, run_id="killed", versions={{}})
        step = 0
        while True:
            step += 1
            r.log_interval(step, loss=1.0 / step, aux_losses={{"x": float(step)}},
                           notes="x" * 2000)
            if step == 20:
                print("ready", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    r = load_receipt(path)
    assert r.data["run"]["status"] == "running"
    steps = [iv["step"] for iv in r.intervals]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 20
    # a stale tmp file (if the kill hit mid-write) is cleaned up by the next run at that path
    Receipt.create(path, run_id="again", versions={})
    assert [p.name for p in tmp_path.iterdir()] == ["killed.json"]


def test_finish_and_guard(tmp_path):
    r = make(tmp_path, "ok")
    with r.guard():
        r.log_interval(1, loss=1.0)
    d = load_receipt(r.path).data
    assert d["run"]["status"] == "completed" and d["run"]["end_time"]

    r = make(tmp_path, "failed")
    with pytest.raises(ValueError, match="boom"), r.guard():
        raise ValueError("boom")
    assert load_receipt(r.path).data["run"]["status"] == "failed: ValueError: boom"

    r = make(tmp_path, "stopped")
    with pytest.raises(KeyboardInterrupt), r.guard():
        raise KeyboardInterrupt
    assert load_receipt(r.path).data["run"]["status"] == "interrupted"

    with pytest.raises(ReceiptError, match="unknown final status"):
        r.finish("done")


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a megacpp receipt"),
        ('{"kind": "something-else"}', "not a megacpp receipt"),
        ('{"kind": "megacpp-receipt"}', "schema_version missing"),
        ('{"kind": "megacpp-receipt", "schema_version": 99}', "newer than this reader"),
        ('{"kind": "megacpp-receipt", "schema_version": 1, "run": {}}', "field 'recipe'"),
    ],
)
def test_load_errors(tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ReceiptError, match=message):
        load_receipt(path)


def test_load_errors_directory_and_bad_interval(tmp_path):
    with pytest.raises(ReceiptError, match="is a directory"):
        load_receipt(tmp_path)
    r = make(tmp_path)
    d = json.loads(r.path.read_text())
    d["intervals"] = [{"loss": 1.0}]
    r.path.write_text(json.dumps(d))
    with pytest.raises(ReceiptError, match=r"intervals\[0\]"):
        load_receipt(r.path)


# --------------------------------------------------------------------------- show / compare


def test_show(tmp_path, capsys):
    r = synthetic_run(tmp_path, "a", range(10, 101, 10))
    r.data["features"].append({"name": "fire", "from_step": 50, "settings": {}})
    text = format_receipt(r)
    for needle in (
        "run      a  status completed",
        "recipe   tiny",
        "pattern  AEMR/AF/AF  (4 layers: 1 A, 1 E, 1 M, 1 R)",
        "mamba: asked auto, ran reference",
        "megatron_core 0.19.2",
        "absent: mamba_ssm",
        "feature  fire from step 50",
        "intervals 10 (1 warm-up)",
        "last     step 100: loss 4 (aux: moe_load_balancing 0.01, stp 0.059)",
        "1,000 tokens/s, 100.0 TFLOP/s/GPU, MFU 10.1%, peak memory 1.00 GiB",
        "goodput  86.0% of 93.0s wall (compute 80.0s, data_wait 10.0s, checkpoint 0.0s, "
        "warmup_compile 3.0s)",
    ):
        assert needle in text, (needle, text)
    assert main(["receipt", "show", str(r.path)]) == 0
    assert "goodput" in capsys.readouterr().out
    assert main(["receipt", "show", str(r.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["id"] == "a"


def test_compare_uses_the_window_past_warm_up(tmp_path, capsys):
    a = synthetic_run(tmp_path, "a", range(10, 101, 10), warmup_intervals=1)  # warm-up: 10
    b = synthetic_run(
        tmp_path, "b", range(10, 91, 10), warmup_intervals=3, loss0=4.0, tps=1500.0, skip={50}
    )  # warm-up: 10, 20, 30; no step 50
    b.data["intervals"][-2]["warmup"] = True  # step 80: a re-warm-up (e.g. after FIRE)
    result = compare_receipts(a, b)
    assert result["window"] == [40, 90]  # from the later first post-warm-up step, 40
    assert [row["step"] for row in result["rows"]] == [40, 60, 70, 90]
    row = result["rows"][0]
    assert row["a"]["loss"] == pytest.approx(5.0 - 0.4)
    assert row["b"]["loss"] == pytest.approx(4.0 - 0.4)
    assert result["means"]["tokens_per_s"] == (1000.0, 1500.0)
    assert result["means"]["loss"][0] == pytest.approx(5.0 - 0.01 * (40 + 60 + 70 + 90) / 4)

    text = format_comparison(a, b)
    assert "window   steps 40..90 past warm-up in both (4 steps)" in text
    assert "pattern  AEMR/AF/AF (both)" in text
    lines = [ln for ln in text.splitlines() if ln.strip().split(" ")[0] in {"40", "mean"}]
    assert len(lines) == 2 and "-1.0000" in lines[0] and "1.500" in lines[0]
    assert not any(ln.lstrip().startswith(("30 ", "50 ", "80 ")) for ln in text.splitlines())

    assert main(["receipt", "compare", str(a.path), str(b.path)]) == 0
    assert "steps 40..90" in capsys.readouterr().out
    assert main(["receipt", "compare", str(a.path), str(b.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["window"] == [40, 90]


def test_compare_without_common_steps(tmp_path):
    a = synthetic_run(tmp_path, "a", [10])  # only warm-up
    b = synthetic_run(tmp_path, "b", [10, 20])
    assert compare_receipts(a, b)["rows"] == []
    assert "nothing to compare" in format_comparison(a, b)


# --------------------------------------------------------------------------- plot


def test_plot_png(tmp_path, capsys):
    from matplotlib.image import imread

    a = synthetic_run(tmp_path, "a", range(10, 101, 10))
    b = synthetic_run(tmp_path, "b", range(10, 91, 10), loss0=4.0, tps=1500.0)
    out = plot_receipts([a, b], tmp_path / "plots" / "cmp.png")
    raw = out.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(raw) > 5_000
    image = imread(out)
    assert image.shape[0] == 4 * 260  # loss, 2 aux losses, tokens/s: 4 panels of 2.6 in
    assert image[..., :3].std() > 0.05  # not a blank image
    assert len({tuple(px) for px in image[::7, ::7, :3].reshape(-1, 3).round(2)}) > 10

    assert main(["receipt", "plot", str(a.path), str(b.path), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 5_000


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["receipt", "show", str(tmp_path / "missing.json")]) == 2
    assert "megacpp receipt: error: receipt not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["receipt", "compare", str(bad), str(bad)]) == 2
    assert "not a megacpp receipt" in capsys.readouterr().err
    assert main(["receipt", "plot", str(bad), "-o", str(tmp_path / "x.png")]) == 2
