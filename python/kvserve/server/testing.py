"""Run `kvserve serve` in a subprocess on free loopback ports (tests and benchmarks)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

KVSERVE_SERVE = ("kvserve.cli", "serve")
KVSERVE_SERVER = ("kvserve.server.main",)  # the kvserve-server console script
KVSERVE_ROUTE = ("kvserve.cli", "route")  # the router: gRPC and metrics, no HTTP front
_LISTEN = re.compile(r"kvserve gRPC listening on (\S+):(\d+) ")
_METRICS = re.compile(r"kvserve metrics on (http://\S+/metrics)")
_HTTP = re.compile(r"kvserve HTTP listening on (https?://\S+) ")


# `python -m MODULE ARGS`, except that on Linux the server is killed when the process that
# started it dies (PR_SET_PDEATHSIG), so a killed test run leaves no server holding ports.
_BOOT = """import ctypes, runpy, signal, sys
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@dataclass
class ServerProcess:
    """`python -m kvserve.cli serve --port 0 --metrics-port 0 --http-port 0 ARGS`, ports read
    from its log (a flag in ARGS overrides these).

    `command` picks the entry point: KVSERVE_SERVE or KVSERVE_SERVER (the same server).
    """

    args: Sequence[str]
    command: Sequence[str] = KVSERVE_SERVE
    env: dict[str, str] | None = None
    start_timeout_s: float = 120.0
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    metrics_url: str = ""
    http_url: str = ""  # e.g. http://127.0.0.1:PORT (OpenAI base URL: http_url + "/v1")
    lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)
    _deadline: float = 0.0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        return self.launch().wait_ready()

    @property
    def serves_http(self) -> bool:
        return tuple(self.command) != KVSERVE_ROUTE

    def launch(self) -> ServerProcess:
        """Start the process without waiting for it (launch several, then wait_ready each).
        Call it from a thread that outlives the server: the kill-on-parent-death signal
        follows the thread that started the process."""
        cmd = [
            sys.executable,
            "-c",
            _BOOT,
            *self.command,
            "--port",
            "0",
            "--metrics-port",
            "0",
            *(("--http-port", "0") if self.serves_http else ()),
            *self.args,
        ]
        env = {**os.environ, **(self.env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        self._deadline = time.monotonic() + self.start_timeout_s
        return self

    def wait_ready(self) -> ServerProcess:
        assert self.proc is not None, "launch() first"
        deadline = self._deadline
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("kvserve serve did not start:\n" + self.log())
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if m := _LISTEN.search(line):
                self.port = int(m.group(2))
            if m := _METRICS.search(line):
                self.metrics_url = m.group(1)
            if m := _HTTP.search(line):
                self.http_url = m.group(1)
            if (
                self.port
                and (self.metrics_url or _flag(self.args, "--metrics-port") == "-1")
                and (self.http_url or not self.serves_http
                     or _flag(self.args, "--http-port") == "-1")
            ):
                self._ready.set()

    def log(self) -> str:
        return "".join(self.lines)

    def channel(
        self,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, object]] = (),
        aio: bool = False,
    ) -> grpc.Channel | grpc.aio.Channel:
        opts = list(options)
        if credentials is not None:  # the test certificate is for "localhost"
            opts.append(("grpc.ssl_target_name_override", "localhost"))
        if aio:
            if credentials is not None:
                return grpc.aio.secure_channel(self.target, credentials, options=opts)
            return grpc.aio.insecure_channel(self.target, options=opts)
        if credentials is not None:
            return grpc.secure_channel(self.target, credentials, options=opts)
        return grpc.insecure_channel(self.target, options=opts)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the drain; kill if it hangs. The exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return int(self.proc.returncode)

    def __enter__(self) -> ServerProcess:  # noqa: PYI034 (typing.Self needs 3.11)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def _flag(args: Sequence[str], name: str) -> str | None:
    """The last value given for a flag (argparse's rule), or None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def write_self_signed(directory: Path, host: str = "localhost") -> tuple[Path, Path]:
    """A throwaway certificate for `host` (and 127.0.0.1); needs the `cryptography` package."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
