"""The surface of slimllm._core: exception hierarchy, type stub vs module, docstrings, GIL
release (docs/core-api.md)."""

from __future__ import annotations

import ast
import inspect
import pickle
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import slimllm
from slimllm import _core

EXCEPTIONS = [
    "ShapeMismatchError",
    "NonFiniteError",
    "InvalidCountError",
    "InvalidRatioError",
    "EmptyAccumulatorError",
    "NotPositiveDefiniteError",
]
STUB = Path(__file__).resolve().parent.parent / "python" / "slimllm" / "_core.pyi"


@pytest.mark.parametrize("name", EXCEPTIONS)
def test_exception_hierarchy(name):
    cls = getattr(_core, name)
    assert getattr(slimllm, name) is cls
    assert issubclass(cls, slimllm.SlimLLMError)
    assert slimllm.SlimLLMError is _core.SlimLLMError
    assert issubclass(_core.SlimLLMError, Exception)
    assert cls.__module__ == "slimllm._core" and cls.__doc__
    err = pickle.loads(pickle.dumps(cls("message")))
    assert type(err) is cls and str(err) == "message"


def test_raised_errors_carry_the_rust_message():
    with pytest.raises(slimllm.SlimLLMError) as info:
        _core.Moments(3).update(np.zeros((2, 4)))
    assert type(info.value) is _core.ShapeMismatchError
    assert str(info.value).startswith("shape mismatch for ") and "expected 3, got 4" in str(
        info.value
    )
    with pytest.raises(_core.InvalidRatioError, match=r"invalid value for .*: -1"):
        _core.select_channels(np.ones(4), 1, protect_lowest=-1.0)


def stub_tree():
    return ast.parse(STUB.read_text())


def test_stub_lists_exactly_the_module():
    tree = stub_tree()
    stub_names = {
        node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }
    runtime = {n for n in dir(_core) if not n.startswith("_")}
    assert stub_names == runtime
    all_node = next(
        n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__"
    )
    assert sorted(ast.literal_eval(all_node.value)) == sorted(runtime)


def test_stub_signatures_match_runtime():
    for node in stub_tree().body:
        if isinstance(node, ast.FunctionDef):
            params = [a.arg for a in node.args.args]
            assert list(inspect.signature(getattr(_core, node.name)).parameters) == params, (
                node.name
            )
        elif isinstance(node, ast.ClassDef) and not node.name.endswith("Error"):
            cls = getattr(_core, node.name)
            for item in node.body:
                if not isinstance(item, ast.FunctionDef):
                    continue
                assert hasattr(cls, item.name), f"{node.name}.{item.name}"
                is_prop = any(getattr(d, "id", None) == "property" for d in item.decorator_list)
                attr = inspect.getattr_static(cls, item.name)
                if is_prop:
                    assert inspect.isdatadescriptor(attr), f"{node.name}.{item.name} is a property"
                elif item.name == "__init__":
                    assert list(inspect.signature(cls).parameters) == [
                        a.arg for a in item.args.args[1:]
                    ]
                else:
                    is_static = any(getattr(d, "id", None) == "staticmethod"
                                    for d in item.decorator_list)
                    assert is_static == isinstance(attr, staticmethod), (
                        f"{node.name}.{item.name} is a staticmethod"
                    )
                    sig = inspect.signature(getattr(cls, item.name))
                    assert [p for p in sig.parameters if p != "self"] == [
                        a.arg for a in item.args.args[0 if is_static else 1:]
                    ], f"{node.name}.{item.name}"


def test_every_public_object_is_documented():
    for name in dir(_core):
        if name.startswith("_"):
            continue
        obj = getattr(_core, name)
        assert obj.__doc__ and len(obj.__doc__) > 20, name
        if callable(obj) and not isinstance(obj, type):
            assert "DESIGN.md" in obj.__doc__, name
            assert "Raises" in obj.__doc__ or name == "affine_from_paired", name
        if isinstance(obj, type) and not issubclass(obj, BaseException):
            for attr, value in vars(obj).items():
                if not attr.startswith("_"):
                    assert getattr(value, "__doc__", None) or name == "HeadSelection", (
                        f"{name}.{attr}"
                    )
    assert "DESIGN.md" in _core.Moments.__doc__


def test_computation_releases_the_gil():
    """With a huge switch interval a thread that holds the GIL is never preempted: the main
    thread can only run during ``update`` if the binding released the GIL."""
    x = np.random.default_rng(0).standard_normal((4000, 1024))
    acc = _core.Moments(1024)
    started, done = threading.Event(), threading.Event()
    seen_running = []

    def work():
        started.set()
        acc.update(x)
        done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        t = threading.Thread(target=work)
        t.start()
        started.wait()
        seen_running.append(not done.is_set())
        t.join()
    finally:
        sys.setswitchinterval(old)
    assert acc.count == 4000
    assert seen_running == [True]
