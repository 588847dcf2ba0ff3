"""The package's promise to users who only want the core: importing it never
imports torch (the optimizer classes load it on first use)."""

import subprocess
import sys


def test_importing_the_package_does_not_import_torch():
    code = "import sys, merge_core; print('torch' in sys.modules, merge_core.CHUNK)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["False", str(2**16)]
