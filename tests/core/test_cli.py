"""The fewstep command teaches through --help and lists the stages that exist."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewstep.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_stage_commands():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for command in ("models", "corpus", "bench", "curate", "precompute", "train-teacher", "distill",
                    "eval", "demo"):
        assert command in out.stdout, f"{command} missing from fewstep --help"


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("fewstep ")
