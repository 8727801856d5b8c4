"""scripts/bench_r_scan.py: the launch-setting sweep runs (Triton interpreter, tiny size),
picks the best setting per shape and overall, and --apply writes it into ScanKernelConfig."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_r_scan.py"
spec = importlib.util.spec_from_file_location("bench_r_scan", SCRIPT)
bench_r_scan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_r_scan)


NAMES = {"DEFAULT_BLOCK_ROWS": "block_rows", "DEFAULT_NUM_WARPS": "num_warps",
         "DEFAULT_USE_DOT": "use_dot"}


def scan_defaults(source: str) -> dict:
    """The module's launch defaults, read from its source."""
    out = {}
    for node in ast.parse(source).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id in NAMES:
            out[NAMES[target.id]] = ast.literal_eval(node.value)
    return out


def test_best_overall_is_the_smallest_geometric_mean_relative_to_the_default():
    a = json.dumps({"block_rows": 16, "num_warps": 2, "use_dot": True}, sort_keys=True)
    b = json.dumps({"block_rows": 32, "num_warps": 4, "use_dot": True}, sort_keys=True)
    per_shape = {"16": {"default": 10.0, a: 5.0, b: 8.0},  # a: 0.5, b: 0.8
                 "32": {"default": 10.0, a: 16.0, b: 8.0}}  # a: 1.6, b: 0.8
    config, relative = bench_r_scan.best_overall(per_shape)
    assert config == json.loads(b) and relative == pytest.approx(0.8)
    with pytest.raises(ValueError, match="every shape"):
        bench_r_scan.best_overall({"16": {"default": 1.0, a: 1.0}, "32": {"default": 1.0}})


def test_apply_writes_the_defaults_once_and_keeps_the_module_valid():
    source = bench_r_scan.TRITON_MODULE.read_text()
    assert scan_defaults(source) == {"block_rows": 16, "num_warps": None, "use_dot": True}
    config = {"block_rows": 32, "num_warps": 2, "use_dot": False}
    once = bench_r_scan.apply_defaults(source, config, "H200, T=4096")
    twice = bench_r_scan.apply_defaults(once, {**config, "num_warps": 4}, "H200 again")
    assert scan_defaults(once) == config
    assert scan_defaults(twice) == {**config, "num_warps": 4}
    note = "# measured by scripts/bench_r_scan.py --sweep: "
    assert twice.count(note) == 1 and note + "H200 again\nDEFAULT_BLOCK_ROWS = 32" in twice
    # only the three lines changed (besides the note)
    lines = [line for line in twice.splitlines() if not line.startswith(note)]
    changed = [b for a, b in zip(source.splitlines(), lines, strict=True) if a != b]
    assert changed == ["DEFAULT_BLOCK_ROWS = 32", "DEFAULT_NUM_WARPS: int | None = 4",
                       "DEFAULT_USE_DOT = False"]
    compile(twice, "fused.py", "exec")
    with pytest.raises(ValueError, match="DEFAULT_BLOCK_ROWS: its line was not found"):
        bench_r_scan.apply_defaults("x = 1\n", config, "")


def test_the_sweep_runs_under_the_interpreter_and_apply_uses_its_result(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "sweep.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sweep", "--no-reference", "--T", "2", "--heads", "1",
         "--K", "16", "--V", "16", "--backward-chunk", "2", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best for H=1: fused bk=16" in proc.stdout
    assert "best over all shapes: fused bk=16" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["shapes"]["1"]
    assert len(rows) == 1 + 4 * 2  # the default + 4 warp counts x (dot, broadcast) at bk=16
    assert all("ms" in row for row in rows)
    target = tmp_path / "fused.py"
    target.write_text(bench_r_scan.TRITON_MODULE.read_text())
    config = bench_r_scan.apply_file(out, target)
    assert scan_defaults(target.read_text()) == config == result["overall_best"]


def test_applied_defaults_stay_within_what_each_shape_allows(monkeypatch):
    pytest.importorskip("triton")
    from megacpp_mcore.ops.m2rnn import fused as mt

    assert mt._resolve_config(64, 16, None) == (16, 1, True)  # unchanged out of the box
    monkeypatch.setattr(mt, "DEFAULT_BLOCK_ROWS", 32)
    monkeypatch.setattr(mt, "DEFAULT_NUM_WARPS", 2)
    monkeypatch.setattr(mt, "DEFAULT_USE_DOT", False)
    assert mt._resolve_config(64, 16, None) == (32, 2, False)
    assert mt._resolve_config(16, 16, None) == (16, 2, False)  # block rows at most K
    assert mt._resolve_config(64, 64, None) == (32, 2, True)  # broadcast too large: dot
    assert mt._resolve_config(64, 16, mt.ScanKernelConfig(block_rows=64, num_warps=4,
                                                          use_dot=True)) == (64, 4, True)
    with pytest.raises(ValueError, match="use_dot=False"):  # explicit requests still checked
        mt._resolve_config(64, 64, mt.ScanKernelConfig(use_dot=False))
