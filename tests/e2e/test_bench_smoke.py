"""The benchmark suite in its quick form: every contender runs and produces numbers. Timings are not judged."""
import json
import subprocess
import sys

from conftest import BIN, ROOT

CONTENDERS = ["direct", "socat", "ssh -R", "ssh -R tuned", "EdgeTunnel (forward → TLS CONNECT)",
              "EdgeTunnel (forward → Unix socket CONNECT)"]


def test_every_contender_produces_numbers(tmp_path):
    result = subprocess.run([sys.executable, ROOT / "scripts" / "bench", "--quick", "--bin-dir", BIN,
                             "--output", tmp_path / "out", "--work-dir", tmp_path / "work"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert list(data["results"]) == CONTENDERS
    for name, figures in data["results"].items():
        # Every contender carried traffic and every figure was measured; how fast is not judged here (a
        # 2-second run of a slow relay may complete no 1 MiB request at all).
        for key in ["iperf3_1_stream_gbit_s", "iperf3_8_streams_gbit_s"]:
            assert figures[key]["median"] > 0, (name, key, "no bytes moved")
        for key in ["wrk_1k_rps", "wrk_1m_rps", "wrk_1k_p99_ms", "wrk_1m_p99_ms"]:
            assert isinstance(figures[key]["median"], (int, float)), (name, key)
            assert len(figures[key]["runs"]) == 1, (name, key)
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "EdgeTunnel (forward → TLS CONNECT)" in table and "× ssh -R" in table
