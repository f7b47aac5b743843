"""Shared fixtures for end-to-end tests: they run the real binaries that `swift build` made."""
import os
import pathlib

import pytest

from support.binaries import BIN, ROOT, run  # noqa: F401  (tests import these from here)


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


# ---------------------------------------------------------------------------------------------------------------
# Running in parallel (pytest-xdist, `scripts/test` runs `-n 3 --dist loadgroup`).
#
# Every test starts its own processes on ports from `free_port()`, which gives each xdist worker its own share of
# the range (scripts/freeport.py), in its own tmp_path; namespaces, veth pairs and /etc/netns folders carry a random
# tag, and every iptables rule is made inside a test's own namespace. So most tests may overlap. A test module
# listed here runs on one worker, one test at a time (its group is one unit of work):
XDIST_GROUPS = {
    # CPU-bound load generators whose assertions are rates and deadlines: an attacker thread looping flat out
    # against a debug build (at least N rounds per scenario, victim downloads within 20 s, closes within 9.5-25 s)
    # and the benchmark smoke (iperf3 and wrk at full speed). Two of them at once on a 2-core machine would halve
    # each other's rates, so they take turns; lighter tests still run beside them.
    "test_hostile_peers": "cpu-bound",
    "test_hostile_peers_streams": "cpu-bound",
    "test_hostile_scenarios": "cpu-bound",
    "test_hostile_rest": "cpu-bound",
    "test_hostile_rest_connections": "cpu-bound",
    "test_bench_smoke": "cpu-bound",
    # Each test runs 20 agents and 3-4 replicas and bounds the time until every agent holds every replica: one
    # such fleet at a time.
    "test_replicas": "replicas",
    # A module-scoped cluster: its tests stay on one worker, which sets the cluster up once.
    "test_http_routing": "http-routing",
}
# Not listed, so free to overlap: the namespace tests (their own namespaces; failover and keepalive timers with
# bounds of tens of seconds), and the tests that bound their own processes' RSS (test_resume,
# test_memory_adversary*), which another worker's load does not change. A new module whose test loads the CPU
# flat out, or asserts a rate, joins "cpu-bound".


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests of one group run on one xdist worker, in turn")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = XDIST_GROUPS.get(item.path.stem)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


# ---------------------------------------------------------------------------------------------------------------
# Never a silent skip. A machine that lacks a tool, a kernel feature or root skips the tests that need it: the end
# of the run lists every skip with its reason, and run as root or with CI=true (where everything can run) any skip
# fails the run. Under xdist the workers' reports reach these hooks on the controller, which counts them.
_skips = []


def _skips_fail_the_run():
    return os.geteuid() == 0 or os.environ.get("CI") == "true"


def _skip_reason(report):
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _note_skip(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append((report.nodeid, _skip_reason(report)))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)


def _on_controller(config):
    return not hasattr(config, "workerinput")  # an xdist worker has workerinput; the controller or a plain run not


def pytest_sessionfinish(session, exitstatus):
    if _on_controller(session.config) and _skips and _skips_fail_the_run() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)  # after the slowest durations, right before the short summary and the last line
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _on_controller(config):
        return
    terminalreporter.section("skips")
    terminalreporter.write_line(f"{len(_skips)} skipped")
    for nodeid, reason in _skips:
        terminalreporter.write_line(f"  SKIPPED {nodeid}: {reason}")
    if _skips and _skips_fail_the_run():
        why = "run as root" if os.geteuid() == 0 else "CI=true"
        terminalreporter.write_line(f"FAILED: {len(_skips)} test(s) skipped ({why}: every test must run here)",
                                    red=True, bold=True)
