"""No pickle on any path that bytes from the network or from a job can reach.

Everything llmesh sends is protobuf (or JSON in etcd); files it loads from model and job
directories (which an operator's users fill) are safetensors, JSON or ``torch.load`` with
``weights_only=True``. This scan parses every shipped module and fails on the constructs that
would run code from data:

* importing ``pickle``, ``cPickle``, ``_pickle``, ``dill``, ``cloudpickle``, ``joblib``,
  ``shelve`` or ``marshal`` (any use; none is needed);
* ``torch.load(...)`` without ``weights_only=True``;
* ``numpy.load(..., allow_pickle=True)``;
* ``yaml.load`` / ``yaml.unsafe_load`` / ``yaml.full_load`` (``yaml.safe_load`` is fine);
* ``trust_remote_code=True`` as a literal (remote model code runs only where the operator
  allows it, never by default);
* ``eval`` / ``exec`` calls in the servers and ``common``. (The SDK keeps Byzer-LLM's
  ``impl_func``: with ``execute_impl_func=True`` the *client* runs code its model wrote, on
  its caller's explicit request, in the caller's process; no server ever does.)

The generated stubs (``clients/llmesh/v1``) are skipped: protoc writes them. Tests and
benchmarks are not shipped and are not scanned.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("common", "control_plane", "inference_worker", "trainer_worker", "clients/llmesh")
SKIP = ("clients/llmesh/v1/",)
FORBIDDEN_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}


def _files() -> list[Path]:
    out = []
    for top in SHIPPED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(SKIP):
                out.append(path)
    return out


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _true(call: ast.Call, name: str) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords
    )


def problems_in(source: str, where: str, *, server: bool = True) -> list[str]:
    """What the scan forbids in one module's source (``server``: also eval/exec)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{line}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("torch.load",) and not _true(node, "weights_only"):
                found.append(f"{line}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and _true(node, "allow_pickle"):
                found.append(f"{line}: numpy.load(allow_pickle=True)")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(f"{line}: {name} (use yaml.safe_load)")
            if server and name in ("eval", "exec"):
                found.append(f"{line}: {name}()")
            if _true(node, "trust_remote_code"):
                found.append(f"{line}: trust_remote_code=True")
    return found


def test_the_scan_catches_each_construct() -> None:
    bad = "\n".join(
        [
            "import pickle",
            "from cloudpickle import loads",
            "import torch",
            "torch.load(f)",
            "torch.load(f, weights_only=False)",
            "np.load(f, allow_pickle=True)",
            "yaml.load(s)",
            "eval('1')",
            "AutoModel.from_pretrained(p, trust_remote_code=True)",
        ]
    )
    assert len(problems_in(bad, "x.py")) == 8
    good = "torch.load(f, weights_only=True)\nnp.load(f)\nyaml.safe_load(s)\n"
    assert problems_in(good, "x.py") == []


def test_no_pickle_or_remote_code_in_shipped_code() -> None:
    files = _files()
    assert len(files) > 50, "the scan found too few files; did the layout change?"
    problems = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        server = not rel.startswith("clients/")
        problems += problems_in(path.read_text(), rel, server=server)
    assert problems == []
