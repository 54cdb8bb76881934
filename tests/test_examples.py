"""Every script in examples/ runs offline, in seconds, and writes what it promises.

Scripts are discovered, never listed by hand, so a new example is tested the day it lands. Each one runs as
``__main__`` in this process (no second interpreter start-up) with the network switched off, from a scratch working
folder. Quick arguments come from ``QUICK_ARGS``; a script not named there gets ``--quick`` / ``--out DIR`` when its
source declares those flags and no arguments otherwise.
"""

from __future__ import annotations

import json
import re
import runpy
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))

#: seconds one example may take on a busy 2-core CPU before the test fails
TIME_LIMIT_S = 120.0

_TINY_ITSELF = [
    "--demo",
    "--demo-seconds",
    "1",
    "--synthetic-ids",
    "12",
    "--synthetic-images-per-id",
    "2",
    "--synthetic-captions-per-image",
    "1",
    "--epochs",
    "1",
    "--max-steps-per-epoch",
    "1",
    "--batch-size",
    "8",
    "--eval-batch-size",
    "16",
    "--embed-dim",
    "32",
    "--vision-cfg",
    json.dumps({"layers": 2, "width": 32, "head_width": 16, "patch_size": 16, "mlp_ratio": 2.0}),
    "--text-cfg",
    json.dumps({"vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0}),
    "--context-length",
    "32",
    "--local-dim",
    "64",
    "--adapter-hidden",
    "32",
    "--no-progress",
]

#: per-script arguments ("{out}" is the scratch output folder) and the files it must write there
QUICK_ARGS: dict[str, tuple[list[str], list[str]]] = {
    "quickstart.py": (["--out", "{out}", "--steps", "3", "--depth", "4"], ["quickstart.png"]),
    "train_itself.py": ([*_TINY_ITSELF, "--out", "{out}"], ["kept_tokens.png", "metrics.jsonl"]),
}
#: scripts that take more than ~5 s on a 2-core CPU even in their quick mode
SLOW = {"train_itself.py"}


def _args_for(script: Path, out: Path) -> tuple[list[str], list[str]]:
    if script.name in QUICK_ARGS:
        args, expected = QUICK_ARGS[script.name]
        return [a.replace("{out}", str(out)) for a in args], expected
    source = script.read_text()
    args = []
    if '"--quick"' in source:
        args.append("--quick")
    if '"--out"' in source:
        args += ["--out", str(out)]
    return args, []


def _no_network(*args, **kwargs):
    raise OSError("examples must run offline: a network connection was attempted")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Scratch cwd; process-wide settings an example may change are restored afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    argv = sys.argv[:]
    yield tmp_path
    torch.set_num_threads(threads)
    sys.argv = argv


def test_examples_exist():
    names = {s.name for s in SCRIPTS}
    assert {"quickstart.py", "train_itself.py"} <= names, names
    stale = set(QUICK_ARGS) - names
    assert not stale, f"QUICK_ARGS names scripts that are gone: {stale}"


@pytest.mark.parametrize(
    "script", [pytest.param(s, id=s.name, marks=[pytest.mark.slow] if s.name in SLOW else []) for s in SCRIPTS]
)
def test_example_runs(script, offline, isolated, capsys):
    out = isolated / "out"
    args, expected = _args_for(script, out)
    sys.argv = [str(script), *args]
    start = time.perf_counter()
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        assert exc.code in (0, None), f"{script.name} exited with {exc.code}"
    elapsed = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert printed.strip(), f"{script.name} printed nothing"
    for name in expected:
        assert (out / name).is_file(), f"{script.name} did not write {name}"
    assert elapsed < TIME_LIMIT_S, f"{script.name} took {elapsed:.0f} s"


def test_getting_started_page_runs_as_written(offline, isolated):
    """The Python blocks of docs/getting_started.md, one after the other, as a reader would paste them."""
    page = EXAMPLES.parent / "docs" / "getting_started.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) >= 3, "the page lost its code"
    scope: dict = {"__name__": "getting_started"}
    exec(compile("\n".join(blocks), str(page), "exec"), scope)
    assert scope["out"].indices.shape == (2, scope["out"].k)
    assert (isolated / "saliency.png").is_file() and (isolated / "kept.png").is_file()


def test_viz_page_first_example_runs_as_written(offline, isolated):
    """The first Python block of docs/viz.md: the capture's metadata read after the ``with`` block."""
    import warnings

    page = EXAMPLES.parent / "docs" / "viz.md"
    block = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)[0]
    scope: dict = {"__name__": "viz_page"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no grid is guessed: the capture gives it
        exec(compile(block, str(page), "exec"), scope)
    assert scope["cap"].grid == (12, 4)
    assert (isolated / "sal.png").is_file() and (isolated / "kept.png").is_file()


def test_prune_page_examples_run_as_written(offline, isolated):
    """Each ten-line example of docs/prune.md, as a reader would paste it."""
    page = EXAMPLES.parent / "docs" / "prune.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    examples = [b for b in blocks if "import attnselect as asel" in b and "model(images)" not in b]
    assert len(examples) == 3, "the page lost an ecosystem example"
    for block in examples:
        scope: dict = {"__name__": "prune_page"}
        exec(compile(block, str(page), "exec"), scope)
        assert scope["handle"].kept and not scope["handle"].active
