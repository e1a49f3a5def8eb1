"""The device runtime must run on a Pi: no torch, no transformers, no other fedmoe package."""

import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "coordinator", "export", "android_harness")


def test_device_runtime_imports_nothing_forbidden():
    code = (
        "import sys, pkgutil, importlib, device_runtime\n"
        "for m in pkgutil.walk_packages(device_runtime.__path__, 'device_runtime.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"device_runtime pulled in: {out.stdout.strip()}"
