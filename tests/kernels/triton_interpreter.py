"""How a kernel test file runs its cases: compiled on a GPU, under Triton's interpreter on CPU.

``TRITON_INTERPRET`` must be set before Triton is imported, so on a machine without CUDA the
kernel cases of a file run in a fresh pytest process with it set; in this process they are
skipped (``kernel_case``) and ``interpreter_test(__file__)`` is the one test that runs them.
A file declares::

    test_cases_pass_under_the_interpreter = interpreter_test(__file__)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CAN_RUN = torch.cuda.is_available() or INTERPRETED  # the kernel cases run in this process
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernel_case = pytest.mark.skipif(not CAN_RUN, reason="run by test_cases_pass_under_the_interpreter")


def interpreter_test(path: str) -> Callable[[], None]:
    """The test that runs ``path``'s kernel cases under the interpreter (skipped where they
    already run directly)."""

    @pytest.mark.skipif(CAN_RUN, reason="the cases run directly here")
    def test_cases_pass_under_the_interpreter() -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "pytest", path, "-q", "-x", "-p", "no:cacheprovider"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert " passed" in done.stdout and " failed" not in done.stdout

    return test_cases_pass_under_the_interpreter
