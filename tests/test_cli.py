"""The ``glimpse`` console script: command listing, bad commands, and ``tiny-model``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from glimpse.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def _glimpse(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("glimpse")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "glimpse.cli"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_exits_2(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_bad_flag_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["tiny-model", "--variant", "glm9"])
    assert exc.value.code == 2


def test_tiny_model_subprocess_writes_the_same_checkpoint(tmp_path, tiny_ckpt_46):
    out = tmp_path / "ckpt"
    proc = _glimpse("tiny-model", "--out", str(out), "--variant", "glm4.6v", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    expected = sorted(p.name for p in tiny_ckpt_46.iterdir())
    assert sorted(p.name for p in out.iterdir()) == expected
    assert "model.safetensors" in expected and "tokenizer.json" in expected
    # A separate process builds byte-identical files (tokenizer training included).
    for name in expected:
        assert (out / name).read_bytes() == (tiny_ckpt_46 / name).read_bytes(), name
