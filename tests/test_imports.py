"""The runtime stays light: importing engine loads neither torch nor transformers."""

import subprocess
import sys


def test_engine_import_pulls_in_no_torch():
    code = ("import sys, engine, engine.cli, engine.evaluate; from engine import Engine; "
            "bad = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
