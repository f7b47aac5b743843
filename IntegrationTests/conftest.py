"""Shared fixtures for end-to-end tests: they run the real binaries that `swift build` made."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(os.environ.get("EDGETUNNEL_BIN_DIR", ROOT / ".build" / "debug"))


def run(*args, check=True, timeout=120, **kwargs):
    """Runs a command, returning the CompletedProcess with text output."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def edgetunnel():
    path = BIN / "edgetunnel"
    assert path.exists(), f"{path} is missing: build first (scripts/test does)"

    def call(*args, check=True):
        return run(path, *args, check=check)

    return call


def assert_one_line_error(result, *needles):
    """A failed command: non-zero exit, exactly one line on stderr naming the culprit, no crash."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert "Fatal error" not in result.stderr and "Stack dump" not in result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def snapshot(folder):
    """Every file under `folder` with its bytes and mode, to prove that a failed command changed nothing."""
    folder = pathlib.Path(folder)
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
