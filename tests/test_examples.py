"""The demos in examples/ run (short versions) and prove what they say."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, args", [
    ("guest_memory.py", ["--size", "96M"]),
    ("guest_keeps_writing.py", ["--restarts", "2", "--seconds", "0.5"]),
    ("clean_vs_unclean.py", []),
    ("iommu_dma.py", ["--guest", "16M", "--seconds", "0.4"]),
    ("sidecar_carve.py", ["--guest", "256M", "--carve", "64M"]),
    # flow d only: (a) and (c) have their own tests in test_vm.py
    ("vm_live_update.py", ["--ram", "256M", "--check-mib", "96", "--flows", "d"]),
])
def test_demo(script, args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout
    assert "Traceback" not in r.stderr
    assert "✔" in r.stdout
