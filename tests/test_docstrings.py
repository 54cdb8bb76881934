"""Every public class and function documents itself with an ``Examples:`` section, and the examples run.

Public means a class or function named in ``__all__`` of the modules below. The examples are doctests: the cheap
ones (plain torch, the CPU reference path of the kernels, matplotlib's Agg canvas, a generic PyTorch transformer as
capture host) run in the quick suite; the ones that import a host library (timm, open_clip, torchvision) or build
an ITSELF model run under the ``slow`` marker. Lines that would download weights, need a GPU, write outside a
temporary folder or train for seconds carry ``# doctest: +SKIP`` in the docstring itself.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import re

import pytest
import torch

import attnselect

MODULES = (
    "attnselect",
    "attnselect.functional",
    "attnselect.rollout",
    "attnselect.scheduler",
    "attnselect.bank",
    "attnselect.pooling",
    "attnselect.hooks",
    "attnselect.kernels",
    "attnselect.models",
    "attnselect.losses",
    "attnselect.metrics",
    "attnselect.data",
    "attnselect.viz",
    "attnselect.train",
)

#: modules whose examples build ITSELF models (open_clip) or read data with the CLIP tokenizer: all slow
SLOW_MODULES = frozenset({"attnselect.models", "attnselect.train"})

#: single objects whose examples import timm, open_clip's tokenizer or torchvision (seconds of imports each)
SLOW_OBJECTS = frozenset(
    {
        "attnselect.hooks.AttachHandle",
        "attnselect.hooks.attach_bank",
        "attnselect.hooks.detach_bank",
        "attnselect.data.ImageDataset",
        "attnselect.data.PedesTrainDataset",
        "attnselect.data.TextDataset",
        "attnselect.data.tokenize",
        "attnselect.data.build_test_transform",
        "attnselect.data.build_train_transform",
    }
)

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

_SECTION = re.compile(r"^\s*([A-Z][A-Za-z ]*):\s*$", re.MULTILINE)


def _public(module_name: str) -> list[tuple[str, object]]:
    """``(qualified name, object)`` for every class and function in the module's ``__all__``."""
    module = importlib.import_module(module_name)
    out = []
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name, None)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append((f"{module_name}.{name}", obj))
    return out


def _doctest_cases(slow: bool) -> list[str]:
    """The modules whose examples run in the quick (``slow=False``) or the slow suite, as pytest ids."""
    cases = []
    for module_name in MODULES:
        if module_name == "attnselect":
            continue  # only re-exports of the submodules below, whose examples run there
        names = [q for q, _ in _public(module_name)]
        if module_name in SLOW_MODULES:
            has = bool(names) and slow
        else:
            has = any((q in SLOW_OBJECTS) == slow for q in names)
        if has:
            cases.append(module_name)
    return cases


def test_lists_are_current():
    assert all(_public(m) for m in MODULES), [m for m in MODULES if not _public(m)]
    known = {q for m in MODULES for q, _ in _public(m)}
    assert SLOW_OBJECTS <= known, f"SLOW_OBJECTS names unknown objects: {sorted(SLOW_OBJECTS - known)}"


@pytest.mark.parametrize("module_name", MODULES)
def test_public_objects_have_examples(module_name):
    problems = []
    for qualname, obj in _public(module_name):
        doc = inspect.getdoc(obj) or ""
        sections = _SECTION.findall(doc)
        if "Examples" not in sections:
            problems.append(f"{qualname}: no 'Examples:' section")
            continue
        if "Example" in sections:
            problems.append(f"{qualname}: a singular 'Example:' section (the docs site needs 'Examples:')")
        examples = doc[doc.index("Examples:") :]
        if ">>> " not in examples:
            problems.append(f"{qualname}: the 'Examples:' section holds no '>>>' line")
    assert not problems, "\n".join(problems)


def _run_examples(module_name: str, slow: bool) -> int:
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS, verbose=False)
    report = io.StringIO()
    examples = failed = 0
    with torch.random.fork_rng():  # the examples draw random tensors; leave the global RNG as it was
        for qualname, obj in _public(module_name):
            if module_name not in SLOW_MODULES and (qualname in SLOW_OBJECTS) != slow:
                continue
            for test in finder.find(obj, qualname, extraglobs={"torch": torch, "asel": attnselect}):
                result = runner.run(test, out=report.write, clear_globs=True)
                examples += result.attempted
                failed += result.failed
    assert failed == 0, f"{failed} failing example(s) in {module_name}:\n{report.getvalue()}"
    return examples


@pytest.mark.parametrize("module_name", _doctest_cases(slow=False))
def test_examples_run(module_name):
    assert _run_examples(module_name, slow=False) > 0


@pytest.mark.slow
@pytest.mark.parametrize("module_name", _doctest_cases(slow=True))
def test_examples_run_slow(module_name):
    assert _run_examples(module_name, slow=True) > 0
