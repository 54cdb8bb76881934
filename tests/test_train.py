"""The ITSELF training engine: configuration, optimiser recipe, checkpoints, a learning run and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("torchvision")
pytest.importorskip("safetensors")

from attnselect.data import load_pedes, synthetic_pedes_root
from attnselect.models import ITSELF, ITSELFConfig
from attnselect.train import (
    TrainConfig,
    build_optimizer,
    evaluate,
    load_model,
    lr_factor,
    parse_args,
    tiny_config,
    train,
)

SYNTH = dict(num_ids=40, images_per_id=3, captions_per_image=2, image_size=(48, 16), seed=0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return synthetic_pedes_root(tmp_path_factory.mktemp("synth"), **SYNTH)


def _config(out: Path, root: Path, **kw) -> TrainConfig:
    return tiny_config(out, root=str(root), **kw)


# ---------------------------------------------------------------------------------------------------- configuration
def test_published_defaults():
    c = TrainConfig()
    assert (c.lr, c.betas, c.eps, c.weight_decay) == (1e-5, (0.9, 0.999), 1e-3, 4e-5)
    assert (c.bias_lr_factor, c.bias_weight_decay, c.classifier_lr_factor, c.adapter_lr) == (2.0, 0.0, 5.0, 1e-3)
    assert (c.epochs, c.warmup_epochs, c.warmup_factor, c.batch_size, c.num_instances) == (60, 5, 0.1, 256, 2)
    m = c.model
    assert (m.tau, m.margin, m.rho_start, m.rho_end, m.ats_total_steps, m.eval_ratio) == (
        0.015,
        0.1,
        0.65,
        0.5,
        1450,
        0.4,
    )
    assert (m.local_dim, m.adapter_hidden, m.pool, m.lam, m.image_size) == (4096, 2048, "max", 0.68, (384, 128))


def test_lr_schedule_values():
    c = TrainConfig()
    assert lr_factor(0, c) == pytest.approx(0.1)
    assert lr_factor(4, c) == pytest.approx(0.1 * 0.2 + 0.8)
    assert lr_factor(5, c) == pytest.approx(1.0)
    assert lr_factor(5 + 55 // 2, c) == pytest.approx(0.5 * (1 + np.cos(np.pi * 27 / 55)))
    assert lr_factor(59, c) == pytest.approx(0.5 * (1 + np.cos(np.pi * 54 / 55)))


def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("epochs: 7\nlr: 2.0e-5\nmodel:\n  selection: consistent\n  layers: [2, late]\n")
    c, _ = parse_args(["--config", str(cfg_file), "--lr", "3e-5", "--pool", "gpo", "--no-augment", "--out", "x"])
    assert (c.epochs, c.lr, c.augment, c.out_dir) == (7, 3e-5, False, "x")
    assert (c.model.selection, c.model.layers, c.model.pool) == ("consistent", (2, "late"), "gpo")
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"batch_size": 64, "model": {"image_size": [256, 128]}}))
    c, _ = parse_args(["--config", str(json_file), "--image-size", "224", "96", "--adapter-lr", "none"])
    assert (c.batch_size, c.model.image_size, c.adapter_lr) == (64, (224, 96), None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)])
    c, _ = parse_args(["--demo", "--demo-seconds", "30"])
    assert c.time_budget_s == 30 and c.device == "cpu" and c.model.backbone is None


def test_example_configs_parse():
    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        c, _ = parse_args(["--config", str(path)])
        assert c.model.embed_dim is None or c.model.embed_dim > 0


def test_optimizer_groups():
    model = ITSELF(tiny_config("unused", model={"num_classes": 4}).model)
    opt = build_optimizer(model, TrainConfig())
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())

    def group(name):
        return by_param[id(named[name])]

    assert (group("clip.visual.conv1.weight")["lr"], group("clip.visual.conv1.weight")["weight_decay"]) == (1e-5, 4e-5)
    assert (group("clip.ln_final.bias")["lr"], group("clip.ln_final.bias")["weight_decay"]) == (2e-5, 0.0)
    assert group("global_cid.pair_classifier.weight")["lr"] == pytest.approx(5e-5)
    assert group("global_cid.pair_classifier.bias")["lr"] == pytest.approx(5e-5)
    assert group("global_cid.pair_classifier.bias")["weight_decay"] == 0.0
    assert group("local_cid.pair_head.0.weight")["lr"] == 1e-5
    assert group("image_bank.adapter.fc.weight")["lr"] == 1e-3
    assert group("text_bank.adapter.fc.bias")["lr"] == 1e-3 and group("text_bank.adapter.fc.bias")["weight_decay"] == 0
    assert id(named["clip.logit_scale"]) not in by_param
    assert opt.defaults["eps"] == 1e-3 and opt.defaults["betas"] == (0.9, 0.999)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------- training
def _train_split(root: Path) -> dict:
    data = load_pedes("CUHK-PEDES", root)
    seen: dict[str, int] = {}
    for s in data.train:
        seen.setdefault(s.img_path, s.pid)
    return {
        "image_pids": list(seen.values()),
        "img_paths": list(seen),
        "caption_pids": [s.pid for s in data.train],
        "captions": [s.caption for s in data.train],
    }


@pytest.mark.slow
def test_training_run_learns(tmp_path, data_root):
    cfg = _config(
        tmp_path / "run", data_root, epochs=4, batch_size=8, augment=False, text_augment=False, test_at_end=True
    )
    result = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0], losses
    assert lines[-1]["final_test"] == result["test"]
    for name in ("global", "local", "fused"):
        assert set(result["test"][name]) >= {"R1", "R5", "R10", "mAP", "mINP"}
    # the trained embeddings retrieve the training captions' images far above chance
    split = _train_split(data_root)
    model = load_model(tmp_path / "run" / "checkpoints" / "last")
    metrics = evaluate(model, split, cfg, torch.device("cpu"))
    pids = np.asarray(split["image_pids"])
    chance = float(np.mean([np.mean(pids == p) for p in split["caption_pids"]]) * 100)
    assert metrics["fused"]["R1"] > 3 * chance, (metrics, chance)
    # checkpoint files: safetensors weights + weights-only train state
    state = torch.load(tmp_path / "run" / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 4 and state["ats_step"] == state["global_step"] == result["steps"]
    assert state["optimizer"]["state"] and state["lr_scheduler"]["last_epoch"] == 4


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, data_root):
    kw = dict(epochs=2, max_steps_per_epoch=2, augment=True, text_augment=True)
    full = _config(tmp_path / "full", data_root, **kw)
    train(full)
    part = _config(tmp_path / "part", data_root, stop_after=1, **kw)
    train(part)
    state = torch.load(tmp_path / "part" / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["ats_step"]) == (1, 2)
    train(_config(tmp_path / "part", data_root, resume="auto", **kw))
    a = load_model(tmp_path / "full" / "checkpoints" / "last")
    b = load_model(tmp_path / "part" / "checkpoints" / "last")
    assert a.ats.current_step == b.ats.current_step == 4
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
    ta = torch.load(tmp_path / "full" / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    tb = torch.load(tmp_path / "part" / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert ta["global_step"] == tb["global_step"] == 4
    assert ta["lr_scheduler"] == tb["lr_scheduler"]
    for key, st in ta["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], tb["optimizer"]["state"][key]["exp_avg_sq"])


def test_resume_restores_ats_and_model_config(tmp_path):
    """save/load round trip without training: ATS step, weights and config come back."""
    from attnselect.train import load_checkpoint, save_checkpoint

    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = ITSELF(ITSELFConfig(**{**cfg.model.to_dict(), "num_classes": 3}))
    for _ in range(7):
        model.ats.step()
    save_checkpoint(tmp_path / "ck", model, epoch=2, global_step=7, config=cfg)
    other = ITSELF(ITSELFConfig(**{**cfg.model.to_dict(), "num_classes": 3}))
    state = load_checkpoint(tmp_path / "ck", other)
    assert other.ats.current_step == 7 and state["epoch"] == 2
    for (k, v), w in zip(model.state_dict().items(), other.state_dict().values()):
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, w), k


@pytest.mark.slow
def test_eval_flags_and_best_checkpoint_resume(tmp_path, data_root, capsys):
    """--eval-only applies the inference flags given on the command line; a weights-only 'best' folder is no resume."""
    from attnselect.train import eval_main

    train(_config(tmp_path / "run", data_root, epochs=1, eval_every=1))
    last, best = tmp_path / "run" / "checkpoints" / "last", tmp_path / "run" / "checkpoints" / "best"
    assert load_model(last, lam=1.0, selection="consistent").config.selection == "consistent"
    capsys.readouterr()
    eval_main(
        [
            "--eval-only",
            "--resume",
            str(last),
            "--root",
            str(data_root),
            "--lam",
            "1.0",
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ]
    )
    rows = {
        line.split()[0]: line.split()[1:]
        for line in capsys.readouterr().out.splitlines()
        if line[:6] in ("global", "fused ")
    }
    assert rows["fused"] == rows["global"]  # lam = 1 fuses nothing of the local score
    assert best.is_dir()
    with pytest.raises(ValueError, match="optimiser"):
        train(_config(tmp_path / "again", data_root, epochs=2, resume=str(best)))


@pytest.mark.slow
def test_resume_after_mid_epoch_stop_equals_uninterrupted(tmp_path, data_root):
    """A run stopped by its time budget inside an epoch resumes at the next batch of that epoch, not the next epoch."""
    kw = dict(epochs=2, max_steps_per_epoch=2, augment=True, text_augment=True)
    train(_config(tmp_path / "full", data_root, **kw))
    # a budget that is spent before the first step ends: the run stops after one step of the first epoch
    part = train(_config(tmp_path / "part", data_root, time_budget_s=1e-9, **kw))
    assert part["steps"] == 1
    state = torch.load(tmp_path / "part" / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["ats_step"]) == (0, 1, 1)
    assert state["lr_scheduler"]["last_epoch"] == 0  # the unfinished epoch did not advance the LR schedule
    resumed = train(_config(tmp_path / "part", data_root, resume="auto", **kw))
    assert resumed["steps"] == 4
    a = load_model(tmp_path / "full" / "checkpoints" / "last")
    b = load_model(tmp_path / "part" / "checkpoints" / "last")
    assert a.ats.current_step == b.ats.current_step == 4
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k


def test_missing_images_fail_early_with_the_path(tmp_path):
    """A real-layout dataset whose images are not where the annotations say fails before the model is built."""
    folder = tmp_path / "data" / "RSTPReid"
    folder.mkdir(parents=True)
    records = [
        {"id": i // 2, "img_path": f"{i}.jpg", "captions": ["a man in red", "a man"], "split": "train"}
        for i in range(8)
    ]
    (folder / "data_captions.json").write_text(json.dumps(records))
    cfg = tiny_config(tmp_path / "run", dataset="rstp", root=str(tmp_path / "data"), num_workers=2, batch_size=4)
    with pytest.raises(FileNotFoundError, match=r"imgs/0\.jpg"):
        train(cfg)


def test_eval_resume_auto_without_checkpoint_says_so(tmp_path):
    from attnselect.train import eval_main

    with pytest.raises(FileNotFoundError, match="checkpoints/last"):
        eval_main(["--resume", "auto", "--out", str(tmp_path / "none"), "--device", "cpu"])
