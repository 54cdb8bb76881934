"""The attnselect command: help on every sub-command, env, inspect on local models of each ecosystem, bench and the
forwarding to the training engine, and one-line errors."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from attnselect import cli

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    arr = np.zeros((120, 60, 3), np.uint8)
    arr[30:80, 15:45] = 255
    path = tmp_path_factory.mktemp("img") / "person.png"
    Image.fromarray(arr).save(path)
    return str(path)


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------------------------------------------
# help and parsing
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["inspect", "--help"], ["env", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: attnselect" in out
    if argv == ["--help"]:
        for command in ("demo", "train", "eval", "bench", "inspect", "env"):
            assert command in out


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_console_entry_point_is_declared():
    from importlib.metadata import PackageNotFoundError, distribution, entry_points

    try:
        distribution("attnselect")
    except PackageNotFoundError:
        pytest.skip("attnselect is imported from a source tree, not installed: no entry points to read")
    eps = [ep for ep in entry_points(group="console_scripts") if ep.name == "attnselect"]
    assert eps and eps[0].value == "attnselect.cli:main"


# --------------------------------------------------------------------------------------------------------------------
# env
# --------------------------------------------------------------------------------------------------------------------
def test_env_lists_versions_device_and_kernel_status(capsys):
    import torch

    rc, out, _ = _run(["env"], capsys)
    assert rc == 0
    assert torch.__version__ in out
    for key in ("python", "triton", "transformers", "open_clip", "timm", "device", "kernels"):
        assert any(line.startswith(key) for line in out.splitlines()), key
    rc, out, _ = _run(["env", "--json"], capsys)
    info = json.loads(out)
    assert info["torch"] == torch.__version__
    assert info["kernels"]  # the gate's own explanation, never empty


def test_env_reports_the_kernel_switch(capsys, monkeypatch):
    monkeypatch.setenv("ATTNSELECT_KERNELS", "0")
    _, out, _ = _run(["env", "--json"], capsys)
    info = json.loads(out)
    assert info["ATTNSELECT_KERNELS"] == "0"
    import attnselect.kernels as k

    assert info["kernels"] == str(k.explain())


# --------------------------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------------------------
def test_inspect_timm_person_crop(image_file, tmp_path, capsys):
    out_png = tmp_path / "timm.png"
    argv = ["inspect", "timm:vit_tiny_patch16_224", image_file, "--out", str(out_png)]
    argv += ["--model-arg", "depth=3", "--model-arg", "img_size=(96,32)", "--ratio", "0.5"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert out_png.read_bytes()[:8] == PNG
    assert "13 tokens (1 prefix + 6x2 patches)" in out
    assert "rollout over layers [1, 2]" in out and "kept 6 patches" in out


def test_inspect_timm_registers_without_cls(image_file, tmp_path, capsys):
    out_png = tmp_path / "reg.png"
    argv = ["inspect", "timm:vit_tiny_patch16_224", image_file, "--out", str(out_png), "--layers", "0,1"]
    argv += ["--model-arg", "depth=2", "--model-arg", "img_size=64", "--model-arg", "reg_tokens=4"]
    argv += ["--model-arg", "class_token=False", "--model-arg", "global_pool='avg'"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert "20 tokens (4 prefix + 4x4 patches)" in out
    summary = cli.inspect_model(
        cli.load_model(
            "timm:vit_tiny_patch16_224",
            model_args={"depth": 2, "img_size": 64, "reg_tokens": 4, "class_token": False, "global_pool": "avg"},
        ),
        image_file,
        rollout_layers=(0, 1),
        out=tmp_path / "reg2.png",
    )
    assert summary["query"] is None and summary["num_prefix_tokens"] == 4


@pytest.mark.parametrize(
    ("name", "expect"),
    [("clip", "17 tokens (1 prefix + 4x4 patches)"), ("siglip", "16 tokens (0 prefix + 4x4 patches)"),
     ("dinoreg", "21 tokens (5 prefix + 4x4 patches)")],
)  # fmt: skip
def test_inspect_hf_configs(name, expect, image_file, tmp_path, capsys):
    import transformers

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=64)
    cfg = {
        "clip": lambda: transformers.CLIPVisionConfig(patch_size=16, **common),
        "siglip": lambda: transformers.SiglipVisionConfig(patch_size=16, **common),
        "dinoreg": lambda: transformers.Dinov2WithRegistersConfig(patch_size=16, num_register_tokens=4, **common),
    }[name]()
    folder = tmp_path / name
    cfg.save_pretrained(folder)
    spec = f"hf:{folder}" if name != "siglip" else f"hf:{folder / 'config.json'}"
    rc, out, err = _run(["inspect", spec, image_file, "--out", str(tmp_path / "o.png")], capsys)
    assert rc == 0, err
    assert expect in out
    assert (tmp_path / "o.png").read_bytes()[:8] == PNG


def test_inspect_open_clip_from_local_config_and_weights(image_file, tmp_path, capsys):
    import open_clip
    import torch

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    cfg_path = tmp_path / "tiny_clip.json"
    cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.CLIP(**cfg).state_dict(), weights)
    loaded = cli.load_model(f"open_clip:{cfg_path}", weights=str(weights))
    assert loaded.family == "open_clip" and loaded.num_layers == 2 and loaded.image_size == (32, 32)
    ref = torch.load(weights, weights_only=True)
    assert torch.equal(loaded.model.state_dict()["visual.conv1.weight"], ref["visual.conv1.weight"])
    rc, out, err = _run(["inspect", f"open_clip:{cfg_path}", image_file, "--out", str(tmp_path / "oc.png")], capsys)
    assert rc == 0, err
    assert "17 tokens (1 prefix + 4x4 patches)" in out


def test_inspect_hf_folder_with_weights_loads_them(image_file, tmp_path, capsys):
    import torch
    import transformers

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(
        vision_config=dict(**small, image_size=32, patch_size=8),
        text_config=dict(**small, vocab_size=100, max_position_embeddings=8, bos_token_id=98, eos_token_id=99),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    model.save_pretrained(tmp_path / "clip")
    loaded = cli.load_model(f"hf:{tmp_path / 'clip'}")
    ref = model.vision_model.state_dict()
    got = loaded.model.state_dict()
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    rc, out, err = _run(["inspect", f"hf:{tmp_path / 'clip'}", image_file, "--out", str(tmp_path / "c.png")], capsys)
    assert rc == 0, err
    assert "17 tokens (1 prefix + 4x4 patches)" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["inspect", "vit_tiny", "IMG"], "MODEL_SPEC must look like"),
        (["inspect", "keras:vit", "IMG"], "family must be one of"),
        (["inspect", "timm:not_a_model_xyz", "IMG"], "unknown timm model"),
        (["inspect", "timm:vit_tiny_patch16_224", "/nonexistent/x.png", "--model-arg", "depth=1"], "no such file"),
        (["inspect", "hf:/nonexistent/folder", "IMG"], "no such file or directory"),
        (["inspect", "timm:vit_tiny_patch16_224", "IMG", "--model-arg", "depth"], "KEY=VALUE"),
        (["inspect", "timm:vit_tiny_patch16_224", "IMG", "--weights", "/nonexistent.pt"], "--weights"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, needle, image_file, capsys):
    argv = [image_file if a == "IMG" else a for a in argv]
    rc, _, err = _run(argv, capsys)
    assert rc == 1
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_exception(image_file):
    with pytest.raises(cli.CLIError, match="MODEL_SPEC"):
        cli.main(["--debug", "inspect", "nonsense", image_file])


def test_bad_layer_choice(image_file, tmp_path, capsys):
    argv = ["inspect", "timm:vit_tiny_patch16_224", image_file, "--out", str(tmp_path / "x.png")]
    argv += ["--model-arg", "depth=2", "--model-arg", "img_size=32", "--layers", "7"]
    rc, _, err = _run(argv, capsys)
    assert rc == 1 and "out of range" in err


# --------------------------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------------------------
_FAKE_BENCH = """
import json, sys
from pathlib import Path
import harness  # declares "--quick", "--csv" and "--plot-dir"
Path(sys.argv[0]).with_suffix(".args.json").write_text(json.dumps(sys.argv[1:]))
sys.exit(3 if "--fail" in sys.argv else 0)
"""
_FAKE_HARNESS = 'FLAGS = ("--quick", "--csv", "--plot-dir")\n'


def test_bench_runs_scripts_with_flags(tmp_path, capsys):
    (tmp_path / "harness.py").write_text(_FAKE_HARNESS)
    for name in ("rollout", "capture"):
        (tmp_path / f"bench_{name}.py").write_text(_FAKE_BENCH)
    csv = str(tmp_path / "r.csv")
    argv = ["bench", "--dir", str(tmp_path), "--only", "rollout,capture", "--quick", "--csv", csv, "--plot-dir", "p"]
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    for name in ("rollout", "capture"):
        args = json.loads((tmp_path / f"bench_{name}.args.json").read_text())
        assert args == ["--quick", "--csv", csv, "--plot-dir", "p"]
    # unknown options go to every script; a failing script fails the command with one line
    rc, _, err = _run(["bench", "--dir", str(tmp_path), "--only", "rollout", "--fail"], capsys)
    assert rc == 1 and "bench_rollout.py (exit 3)" in err
    rc, _, err = _run(["bench", "--dir", str(tmp_path), "--only", "nope"], capsys)
    assert rc == 1 and "available: capture, rollout" in err
    # a script that does not declare --quick is refused before anything runs
    (tmp_path / "bench_attach.py").write_text("import sys\nsys.exit(0)\n")
    rc, _, err = _run(["bench", "--dir", str(tmp_path), "--only", "rollout,attach", "--quick"], capsys)
    assert rc == 1 and "bench_attach.py (--quick)" in err
    assert not (tmp_path / "bench_attach.args.json").exists()


def test_bench_without_scripts(tmp_path, capsys):
    rc, _, err = _run(["bench", "--dir", str(tmp_path)], capsys)
    assert rc == 1 and "no benchmark scripts found" in err


# --------------------------------------------------------------------------------------------------------------------
# demo / train / eval forwarding
# --------------------------------------------------------------------------------------------------------------------
def test_forwarding_to_the_training_engine(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("attnselect.train")
    fake.train_main = lambda argv: calls.append(("train", argv)) or 0
    fake.eval_main = lambda argv: calls.append(("eval", argv)) or 4
    fake.demo_main = lambda argv: calls.append(("demo", argv))
    monkeypatch.setitem(sys.modules, "attnselect.train", fake)
    assert cli.main(["train", "--epochs", "2", "--help"]) == 0
    assert cli.main(["eval", "--checkpoint", "c.pt"]) == 4
    assert cli.main(["demo"]) == 0
    assert calls == [("train", ["--epochs", "2", "--help"]), ("eval", ["--checkpoint", "c.pt"]), ("demo", [])]


@pytest.mark.parametrize("command", ["demo", "train", "eval"])
def test_engine_help_is_the_engines_own(command, capsys):
    pytest.importorskip("attnselect.train")
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: attnselect {command}" in out and "--batch-size" in out


def test_engine_failure_is_one_line(monkeypatch, capsys):
    fake = types.ModuleType("attnselect.train")

    def boom(argv):
        raise ValueError("epochs must be positive\nsecond line")

    fake.train_main = boom
    monkeypatch.setitem(sys.modules, "attnselect.train", fake)
    rc, _, err = _run(["train", "--epochs", "-1"], capsys)
    assert rc == 1 and err.strip().splitlines() == [
        "attnselect train: error: ValueError: epochs must be positive (run with --debug for the traceback)"
    ]


def test_dataloader_worker_failure_shows_the_original_error(monkeypatch, capsys):
    """An error raised in a DataLoader worker reaches the user as the worker's own last line (e.g. the missing
    file), not as torch's 'Caught ... in DataLoader worker process 0.' header."""
    from torch._utils import ExceptionWrapper

    fake = types.ModuleType("attnselect.train")

    def boom(argv):
        try:
            open("/no/such/dir/img_0001.jpg")
        except FileNotFoundError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    fake.train_main = boom
    monkeypatch.setitem(sys.modules, "attnselect.train", fake)
    rc, _, err = _run(["train"], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert "/no/such/dir/img_0001.jpg" in err and "DataLoader worker process 0" in err
