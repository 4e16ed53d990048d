"""The package type-checks: mypy (pinned in the `test` extra) finds no error in jaxlora/.

The settings live in pyproject.toml under [tool.mypy].
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_mypy_finds_no_errors():
  pytest.importorskip("mypy")
  proc = subprocess.run([sys.executable, "-m", "mypy", "jaxlora"], cwd=ROOT, capture_output=True,
                        text=True, timeout=900, check=False)
  report = proc.stdout + proc.stderr
  assert proc.returncode == 0, f"mypy found errors (exit {proc.returncode}):\n{report}"
  assert "Success: no issues found" in report, report
