"""The prepared GPU suite (benchmarks/gpu_suite.sh): its dry run on a CPU machine, and the target summary it prints."""

from __future__ import annotations

import csv
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def _summary_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("gpu_summary")
    finally:
        sys.path.pop(0)


def test_dry_run_lists_every_step_within_eight_minutes() -> None:
    out = subprocess.run(["bash", str(SUITE), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    total = int(lines[0].split("at most ")[1].split(" s")[0])
    assert total <= 480, lines[0]
    steps = {line.split()[0]: line for line in lines[1:]}
    for script in ("bench_rollout.py", "bench_topk_gather.py", "bench_capture.py", "bench_attach.py",
                   "bench_train_step.py", "profile_kernels.py", "gpu_summary.py"):  # fmt: skip
        assert any(script in line for line in steps.values()), script
    tests = steps["kernel_tests"]
    for name in ("test_kernels.py", "test_compile.py", "test_cuda_graphs.py", "test_kernels_adversarial.py"):
        assert name in tests
    assert "TRITON_INTERPRET" not in tests
    # every script the suite names exists
    for line in steps.values():
        for word in line.split():
            if word.startswith(("benchmarks/", "tests/")):
                assert (ROOT / word).exists(), word


def test_suite_refuses_unknown_arguments() -> None:
    out = subprocess.run(["bash", str(SUITE), "--fast"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--fast" in out.stderr


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    cols = ("op", "provider", "shape", "dtype", "median_ms", "gbps", "peak_mem_mb", "device", "versions", "commit")
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({"gbps": 0, "peak_mem_mb": 0, "versions": "v", **r})


def test_summary_computes_each_target_from_the_run_rows(tmp_path: Path) -> None:
    gs = _summary_module()
    dev, sha = "NVIDIA H200", "abc1234"
    img = "itself-image B=256 N=193 D=512 k=96"
    _write(tmp_path / "topk_gather.csv", [
        # an older commit's row for the same provider must be ignored
        {"op": "topk_gather", "provider": "triton_fwdbwd", "shape": img, "dtype": "float16", "median_ms": 9.0,
         "device": dev, "commit": "old"},
        {"op": "topk_gather", "provider": "torch_topk_gather_fwdbwd", "shape": img, "dtype": "float16",
         "median_ms": 0.30, "device": dev, "commit": sha},
        {"op": "topk_gather", "provider": "triton_fwdbwd", "shape": img, "dtype": "float16", "median_ms": 0.15,
         "device": dev, "commit": sha},
    ])  # fmt: skip
    cap = "itself-image B=256 H=12 N=193 d=64"
    _write(tmp_path / "capture.csv", [
        {"op": "capture", "provider": "host_sdpa", "shape": cap, "dtype": "float16", "median_ms": 0.10,
         "device": dev, "commit": sha},
        {"op": "capture", "provider": "triton", "shape": cap, "dtype": "float16", "median_ms": 0.16,
         "device": dev, "commit": sha},
    ])  # fmt: skip
    roll = "itself-image L=2 B=256 H=12 N=193"
    _write(tmp_path / "rollout.csv", [
        {"op": "rollout", "provider": "published", "shape": roll, "dtype": "float16", "median_ms": 50.0,
         "device": dev, "commit": sha},
        {"op": "rollout", "provider": "triton_query", "shape": roll, "dtype": "float16", "median_ms": 0.25,
         "gbps": 3000.0, "device": dev, "commit": sha},
    ])  # fmt: skip
    rows = {(t.target, t.shape): t for t in gs.targets(tmp_path, dev, sha, copy_gbps=4000.0)}
    topk = next(t for (name, _), t in rows.items() if name.startswith("top-k"))
    assert topk.measured == "2.000x" and topk.met == "yes"
    capture = next(t for (name, _), t in rows.items() if name.startswith("fused capture"))
    assert capture.measured == "1.600x" and capture.met == "no (off by 1.23x)"
    bw = next(t for (name, _), t in rows.items() if name.startswith("rollout query row bandwidth"))
    assert bw.measured == "62.5%" and bw.met == "yes" and "75.0% of the measured copy" in bw.detail
    speed = rows[("rollout query row speed-up over the published code (float16)", roll)]
    assert speed.measured == "200.000x" and speed.met == "yes"
    missing = [t for t in rows.values() if t.met == "not measured"]
    # float32 image, text and ViT-L rollouts, and the train step, have no rows in this run
    assert len(missing) == 4
    table = gs.format_table(list(rows.values()))
    assert table.count("\n") == len(rows) + 1


@pytest.mark.parametrize("argv", [["--commit", "x"]])
def test_summary_needs_a_device_name_without_cuda(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        _summary_module().main(argv)


def test_only_runs_the_named_steps_and_the_summary():
    out = subprocess.run(["bash", str(SUITE), "--dry-run", "--only", "prune,capture"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()[1:]]
    assert names == ["capture", "prune", "summary"]
