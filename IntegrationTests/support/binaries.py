"""Where the binaries under test are, and how a test runs a command: shared by conftest (pytest) and by the harness,
which `scripts/bench` uses too without pytest."""
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("EDGETUNNEL_BIN_DIR", ROOT / ".build" / "debug"))


def run(*args, check=True, timeout=120, **kwargs):
    """Runs a command, returning the CompletedProcess with text output."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
