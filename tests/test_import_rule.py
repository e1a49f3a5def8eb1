"""The device runtime's import rule, an allowlist: a Pi or a phone installs only what is named here.

``device_runtime`` may import only the standard library, itself, and :data:`ALLOWED`. click and rich (the
command line) only in :data:`CLI_MODULES`, the ``fedmoe-device`` commands, which a device that embeds the
runtime (``device_runtime.client.DeviceClient``, as the Android harness does) never imports, plus the
entries of :data:`NAMED_EXCEPTIONS`. The check reads every import statement of every module (lazy ones in
functions included, and ``importlib.import_module("literal")``), so an import on a rarely taken path
fails here as well. A second check imports every non-CLI module and looks at what really got loaded.
A third one forbids import cycles between any of fedmoe's modules (lazy imports included).
"""

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import device_runtime

ALLOWED = {"numpy", "onnxruntime", "tokenizers", "safetensors", "websockets", "cryptography", "msgspec", "Crypto"}
CLI_ONLY = {"click", "rich"}
CLI_MODULES = {"device_runtime/cli.py", "device_runtime/cli_errors.py"}
NAMED_EXCEPTIONS = {
    # the optional progress bar of `fedmoe-device train-local` (progress=True); `run` never shows one
    ("device_runtime/trainer.py", "rich"),
}
NEVER_LOADED = ("torch", "transformers", "coordinator", "export", "android_harness", "click", "rich")
ROOT = Path(device_runtime.__file__).resolve().parent.parent
PACKAGES = ("coordinator", "device_runtime", "export", "android_harness")


def imported_modules(source: str) -> set[str]:
    """Dotted names of every absolute import in ``source``: ``from a.b import c`` gives ``a.b`` and ``a.b.c``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
    return names


def imported_packages(source: str) -> set[str]:
    """Top-level names of every absolute import in ``source`` (relative imports stay inside the package)."""
    return {name.split(".")[0] for name in imported_modules(source)}


def violations(root: Path) -> list[str]:
    """``"<module path>: <package>"`` for every import in ``root/device_runtime`` that the rule forbids."""
    found = []
    for path in sorted((root / "device_runtime").rglob("*.py")):
        module = path.relative_to(root).as_posix()
        for package in sorted(imported_packages(path.read_text())):
            ok = (
                package in sys.stdlib_module_names
                or package == "device_runtime"
                or package in ALLOWED
                or (package in CLI_ONLY and module in CLI_MODULES)
                or (module, package) in NAMED_EXCEPTIONS
            )
            if not ok:
                found.append(f"{module}: {package}")
    return found


def test_device_runtime_imports_only_allowed_packages():
    assert violations(ROOT) == [], "device_runtime imports packages outside its allowlist (tests/test_import_rule.py)"


def test_the_rule_catches_a_forbidden_import(tmp_path):
    pkg = tmp_path / "device_runtime"
    pkg.mkdir()
    (pkg / "ok.py").write_text("import json\nimport numpy as np\nfrom msgspec import Meta\nfrom . import ok\n")
    (pkg / "cli.py").write_text("import click\n")
    (pkg / "lazy.py").write_text("def f():\n    import requests\n    from torch import nn\n")
    (pkg / "dynamic.py").write_text("import importlib\nimportlib.import_module('transformers.models')\n")
    (pkg / "progress.py").write_text("from rich.progress import Progress\n")
    assert violations(tmp_path) == [
        "device_runtime/dynamic.py: transformers",
        "device_runtime/lazy.py: requests",
        "device_runtime/lazy.py: torch",
        "device_runtime/progress.py: rich",
    ]


def test_non_cli_modules_load_no_cli_no_torch_and_no_other_fedmoe_package():
    code = (
        "import sys, pkgutil, importlib, device_runtime\n"
        f"skip = {sorted(p.removesuffix('.py').replace('/', '.') for p in CLI_MODULES)!r}\n"
        "for m in pkgutil.walk_packages(device_runtime.__path__, 'device_runtime.'):\n"
        "    if not m.name.endswith('__main__') and m.name not in skip: importlib.import_module(m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {NEVER_LOADED!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"device_runtime pulled in: {out.stdout.strip()}"


def test_fedmoe_modules_import_each_other_without_cycles():
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
    }
    graph = {
        name: {m for m in imported_modules(path.read_text()) if m in files and m != name}
        for name, path in files.items()
    }
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_the_serving_coordinator_loads_no_torch():
    """``fedmoe-coord serve`` loads torch only when a round needs it (a bundle export, a split round's top): at
    import it cost ~180 MiB of resident memory in every coordinator (bench/bench_connections.py, 10,000 devices)."""
    code = (
        "import sys, coordinator.cli, coordinator.server, coordinator.service, coordinator.split_rounds\n"
        "print(','.join(sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"the coordinator pulled in: {out.stdout.strip()[:200]}"
