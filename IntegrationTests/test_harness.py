"""The harness itself: teardown fails a test whose processes ended badly. Needs no EdgeTunnel binary: the
processes are short Python programs standing in for a server or an agent."""
import pathlib
import signal
import struct
import sys
import time

import pytest

from support.harness import PYTHON_HELPER_EXITS, Cluster, check_exits, stop_and_check, wait_until

# Runs until stopped; exits 0 on SIGTERM, like the EdgeTunnel binaries after draining.
DRAINS = ("import signal, sys, time\n"
          "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
          "print('up', flush=True)\n"
          "time.sleep(60)\n")


def python(code):
    return [sys.executable, "-c", code]


@pytest.fixture
def c(tmp_path):
    """A Cluster without a PKI (no binary needed): only spawn and close are used. Whatever a failed test left
    running is killed."""
    cluster = Cluster.__new__(Cluster)
    cluster.tmp, cluster.procs = pathlib.Path(tmp_path), []
    yield cluster
    for proc in cluster.procs:
        if proc.alive():
            proc.popen.kill()
            proc.popen.wait()


def started(proc):
    wait_until(lambda: "up" in proc.own_text(), 10, "the process to start")
    return proc


def exited(proc):
    wait_until(lambda: not proc.alive(), 10, "the process to exit")
    return proc


def test_a_process_that_exits_on_its_own_fails_the_teardown_and_the_others_are_still_stopped(c):
    crashed = exited(c.spawn(python("print('about to fail', flush=True); import sys; sys.exit(3)"), "server"))
    survivor = started(c.spawn(python(DRAINS), "agent-edge-1"))
    with pytest.raises(AssertionError) as failure:
        c.close()
    message = str(failure.value)
    assert "exited on its own with exit code 3" in message and "about to fail" in message, message
    assert str(crashed.log) in message and "agent-edge-1.log" not in message, message
    assert not survivor.alive() and survivor.popen.returncode == 0  # stopped before the failure was raised


@pytest.mark.parametrize("how", ["flag", "method"])
def test_an_expected_exit_passes(c, how):
    if how == "flag":
        proc = c.spawn(python("import sys; sys.exit(3)"), "server", may_exit=True)
    else:
        proc = c.spawn(python("import sys; sys.exit(3)"), "server").expect_exit()
    exited(proc)
    started(c.spawn(python(DRAINS), "agent"))
    c.close()  # does not raise


@pytest.mark.parametrize("expected", [False, True])
def test_a_crash_fails_even_when_an_exit_was_expected(c, expected):
    proc = c.spawn(python("import os, signal; os.kill(os.getpid(), signal.SIGABRT)"), "server", may_exit=expected)
    exited(proc)
    with pytest.raises(AssertionError, match="crashed: killed by SIGABRT"):
        stop_and_check([proc])


def test_a_swift_trap_in_the_log_fails(c):
    proc = c.spawn(python("print('Fatal error: Unexpectedly found nil', flush=True)\n" + DRAINS), "server")
    started(proc)
    with pytest.raises(AssertionError, match="its log contains 'Fatal error'") as failure:
        stop_and_check([proc])
    assert "Unexpectedly found nil" in str(failure.value)  # the log's last lines are in the message


def test_a_stop_by_sigterm_must_end_cleanly(c):
    exits_1 = started(c.spawn(python(DRAINS.replace("sys.exit(0)", "sys.exit(1)")), "exits-1"))
    default = started(c.spawn(python(DRAINS.replace("signal.signal", "0 and signal.signal")), "default"))
    helper = started(c.spawn(python(DRAINS.replace("signal.signal", "0 and signal.signal")), "helper",
                              clean_exits=PYTHON_HELPER_EXITS))
    clean = started(c.spawn(python(DRAINS), "clean"))
    with pytest.raises(AssertionError) as failure:
        stop_and_check([exits_1, default, helper, clean])
    message = str(failure.value)
    assert "stopped with SIGTERM, it ended with exit code 1" in message, message
    assert "stopped with SIGTERM, it ended with killed by SIGTERM" in message, message
    assert "helper.log" not in message and "clean.log" not in message, message


def test_a_process_killed_after_the_stop_timeout_fails(c):
    stubborn = started(c.spawn(python(DRAINS.replace("lambda *_: sys.exit(0)", "signal.SIG_IGN")), "agent"))
    with pytest.raises(AssertionError, match="did not exit within 1s of SIGTERM and was killed"):
        stop_and_check([stubborn], timeout=1)
    assert not stubborn.alive()


def test_stops_the_test_asked_for_pass(c):
    killed = started(c.spawn(python(DRAINS), "killed"))
    killed.stop(signal.SIGKILL)  # on purpose: any status
    terminated = started(c.spawn(python(DRAINS), "terminated"))
    terminated.send_signal(signal.SIGTERM)  # as test_agent_drains_on_sigterm does
    assert terminated.popen.wait(10) == 0
    stop_and_check([killed, terminated])
    check_exits([killed, terminated])


def test_a_restarted_process_is_judged_by_its_own_part_of_the_shared_log(c):
    first = started(c.spawn(python(DRAINS), "server"))
    assert first.stop() == 0
    second = started(c.spawn(python("print('Fatal error: second', flush=True)\n" + DRAINS), "server"))
    assert first.log == second.log
    assert "Fatal error" not in first.own_text() and "Fatal error" in second.own_text()
    with pytest.raises(AssertionError) as failure:
        c.close()
    assert str(failure.value).count("its log contains") == 1


def test_wait_until_names_and_chains_what_the_predicate_raised():
    def broken():
        raise KeyError("agents")

    with pytest.raises(AssertionError, match=r"waiting for the agents; the last check raised KeyError") as failure:
        wait_until(broken, 0.2, "the agents")
    assert isinstance(failure.value.__cause__, KeyError)
    calls = []
    wait_until(lambda: calls.append(1) or len(calls) > 2, 5, "a third call")  # raising nothing: as before


def test_the_edge_service_blob_never_repeats_and_matches_its_hash():
    import hashlib

    from edge_service import blob, blob_sha256

    data = b"".join(blob(4 * 65536 + 100))
    assert len(data) == 4 * 65536 + 100
    assert hashlib.sha256(data).hexdigest() == blob_sha256(len(data))
    blocks = [data[i:i + 16] for i in range(0, len(data) - 16, 16)]
    assert len(set(blocks)) == len(blocks), "a 16-byte block of the blob repeats"
    swapped = data[65536:131072] + data[:65536] + data[131072:]
    assert hashlib.sha256(swapped).hexdigest() != blob_sha256(len(data))


def test_the_edge_service_answers_a_short_body_with_an_error_not_its_hash(c):
    import socket

    from support.harness import free_port

    port = free_port()
    service = c.spawn([sys.executable, pathlib.Path(__file__).parent / "edge_service.py", "127.0.0.1", port],
                      "edge", clean_exits=PYTHON_HELPER_EXITS)
    wait_until(lambda: socket.create_connection(("127.0.0.1", port), 1).close() is None, 10, "edge service")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        sock.shutdown(socket.SHUT_WR)  # a clean EOF after 5 of the 10 bytes
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    wait_until(lambda: "EDGE POST /sha256: the body ended after 5 of 10 bytes: EOF" in service.own_text(), 5,
               "the short body logged")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n1234567")
        time.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
    wait_until(lambda: "EDGE POST /sha256: the body ended after 7 of 10 bytes: ConnectionResetError"
               in service.own_text(), 5, "the reset logged")
    c.close()


@pytest.mark.parametrize("tls", [False, True])
def test_connection_end_tells_a_reset_from_a_clean_close(tmp_path, tls):
    import socket
    import ssl
    import subprocess
    import threading

    from support.harness import connection_end

    if tls:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", tmp_path / "k", "-out", tmp_path / "c", "-subj", "/CN=x", "-days", "1"],
                       capture_output=True, check=True)
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(tmp_path / "c", tmp_path / "k")
        client_context = ssl.create_default_context()
        client_context.check_hostname, client_context.verify_mode = False, ssl.CERT_NONE
    for how in ("reset", "close"):
        listener = socket.create_server(("127.0.0.1", 0))

        def serve():
            conn, _ = listener.accept()
            conn = server_context.wrap_socket(conn, server_side=True) if tls else conn
            conn.sendall(b"12345")
            conn.recv(1)  # the client read the 5 bytes
            if how == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

        server = threading.Thread(target=serve)
        server.start()
        sock = socket.create_connection(listener.getsockname(), timeout=5)
        if tls:
            sock = client_context.wrap_socket(sock, suppress_ragged_eofs=False)
        assert sock.recv(5) == b"12345"
        sock.sendall(b"x")
        ended = connection_end(sock)
        assert ended == ("reset" if how == "reset" else "FIN"), (how, ended)
        server.join(5)
        sock.close()
        listener.close()
