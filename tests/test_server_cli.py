"""The server's command line: bad options fail fast with the flag named, and the two
entry points (`kvserve serve`, `kvserve-server`) start the same server."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvserve.server.app import host_port
from kvserve.server.config import ServerConfig, ServerConfigError
from kvserve.server.testing import KVSERVE_SERVER
from serving import cpu_flags


def run_server(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *KVSERVE_SERVER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"port": 70000}, "--port"),
        ({"metrics_port": -2}, "--metrics-port"),
        ({"http_port": -2}, "--http-port"),
        ({"http_port": 65536}, "--http-port"),
        ({"served_model_name": " "}, "--served-model-name"),
        ({"tls_cert": Path("/nonexistent/cert.pem")}, "--tls-cert and --tls-key"),
        ({"max_message_bytes": 10}, "--max-message-bytes"),
        ({"grace_period_s": -1.0}, "--grace-period"),
        ({"api_key": "  "}, "--api-key"),
    ],
)
def test_bad_server_options_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ServerConfigError) as info:
        ServerConfig(**kwargs)
    assert str(info.value).startswith(flag)


def test_missing_tls_file_fails_before_the_model_loads(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not really a key")
    res = run_server("--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key))
    assert res.returncode == 2
    assert "--tls-cert: no such file" in res.stderr


def test_host_port_brackets_ipv6() -> None:
    assert host_port("127.0.0.1", 5) == "127.0.0.1:5"
    assert host_port("::1", 5) == "[::1]:5"
    assert host_port("[::]", 5) == "[::]:5"


def test_missing_model_and_busy_port_exit_1_with_a_clear_error(tiny_llama_dir: Path) -> None:
    res = run_server("--model", "/nonexistent/model", "--device", "cpu")
    assert res.returncode == 1
    assert "/nonexistent/model" in res.stderr and "Traceback" not in res.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_server(*cpu_flags(tiny_llama_dir, "1MiB", "--port", str(port),
                                    "--metrics-port", "-1"))
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr
