"""Two CPU processes under torchrun (gloo) take the same steps as one process with the whole global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("torchvision")
safetensors_torch = pytest.importorskip("safetensors.torch")

from attnselect.data import synthetic_pedes_root  # noqa: E402
from attnselect.train import tiny_config, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_ddp_matches_single_process(tmp_path):
    data = synthetic_pedes_root(tmp_path / "data", num_ids=24, images_per_id=3, image_size=(48, 16), seed=1)
    overrides = dict(
        root=str(data),
        epochs=1,
        max_steps_per_epoch=2,
        batch_size=16,
        augment=False,
        text_augment=False,
        eps=1e-3,
        # the adapters keep the published BatchNorm: its masked statistics are all-reduced over the ranks
    )
    single = tiny_config(tmp_path / "single", **overrides)
    train(single)

    config_file = tmp_path / "ddp.json"
    config_file.write_text(json.dumps(tiny_config(tmp_path / "ddp", **overrides).to_dict()))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(ROOT / "examples" / "train_itself.py"),
        "--config",
        str(config_file),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    a = safetensors_torch.load_file(str(tmp_path / "single" / "checkpoints" / "last" / "model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "ddp" / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=k)
    # the losses are computed on features gathered from both ranks: rank 0 logs the global-batch loss
    checked = 0
    for line_a, line_b in zip(
        (tmp_path / "single" / "metrics.jsonl").read_text().splitlines(),
        (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines(),
    ):
        ra, rb = json.loads(line_a), json.loads(line_b)
        if "loss" in ra:
            assert ra["step"] == rb["step"] == 2
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
            checked += 1
    assert checked == 1
