"""Whole-process first-run timings of `kvserve generate` and `kvserve serve`, cold and warm.

    python benches/first_run.py --runs 5

Each round makes an empty cache directory (KVSERVE_CACHE_DIR) holding only a link to the
embedded model's GGUF file, as a fresh install has it, then runs each command twice in it:
cold (nothing converted yet) and warm (the second run). Rounds alternate, so slow drifts of
a shared machine hit both states alike. Timed from just before the process is started:

- generate: until its first generated text reaches stdout (the prompt is echoed first);
- serve: until it logs "kvserve gRPC listening" (it is then stopped with SIGTERM).

CPU seconds (user + sys of the process and its children, whole run) are printed beside the
wall times, since on a shared machine they move less with other people's load.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPT = "The capital of France is"
READY = "kvserve gRPC listening"


@dataclass
class Samples:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _until(proc: subprocess.Popen[bytes], stream: str, done: bytes, start: float,
           timeout: float) -> float:
    """Seconds from start until the stream's accumulated bytes satisfy done (a prefix
    length for stdout, a substring for stderr); the other stream is drained meanwhile."""
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    seen = {"stdout": b"", "stderr": b""}
    while time.perf_counter() - start < timeout:
        for key, _ in sel.select(timeout=1.0):
            chunk = os.read(key.fileobj.fileno(), 1 << 16)  # type: ignore[union-attr]
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            seen[key.data] += chunk
            text = seen[stream]
            if (len(text) > len(done) and text.startswith(done)) if stream == "stdout" \
                    else done in text:
                return time.perf_counter() - start
        if proc.poll() is not None and not sel.get_map():
            break
    raise RuntimeError(f"no {done!r} on {stream} (rc {proc.poll()}):\n"
                       f"{seen['stderr'].decode(errors='replace')[-2000:]}")


def run_generate(env: dict[str, str]) -> tuple[float, float]:
    cpu0 = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kvserve.cli", "generate", "--max-tokens",
                             "4", PROMPT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = _until(proc, "stdout", PROMPT.encode(), start, 300)
    proc.communicate(timeout=300)
    return first, _children_cpu() - cpu0


def run_serve(env: dict[str, str]) -> tuple[float, float]:
    cpu0 = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kvserve.cli", "serve", "--port", "0",
                             "--metrics-port", "-1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        ready = _until(proc, "stderr", READY.encode(), start, 300)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    return ready, _children_cpu() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (each: cold then warm)")
    parser.add_argument("--commands", default="generate,serve")
    args = parser.parse_args()

    from kvserve.default_model import FILENAME, default_model_path

    model = default_model_path()  # fetched once here, not inside a timed run
    commands = {"generate": run_generate, "serve": run_serve}
    chosen = [c.strip() for c in args.commands.split(",")]
    results = {(c, s): Samples() for c in chosen for s in ("cold", "warm")}
    for i in range(args.runs):
        for command in chosen:
            with tempfile.TemporaryDirectory(prefix="kvserve-first-run-") as cache:
                (Path(cache) / FILENAME).symlink_to(model)
                env = dict(os.environ, KVSERVE_CACHE_DIR=cache)
                for state in ("cold", "warm"):
                    wall, cpu = commands[command](env)
                    results[command, state].wall.append(wall)
                    results[command, state].cpu.append(cpu)
                    print(f"round {i} {command} {state}: {wall:.2f} s, {cpu:.2f} CPU s",
                          file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min) at the end; "
          f"{args.runs} rounds\n")
    print("| command | cache | wall min | wall median | CPU s median |")
    print("|---|---|---:|---:|---:|")
    for (command, state), s in results.items():
        print(f"| {command} | {state} | {min(s.wall):.2f} s | {statistics.median(s.wall):.2f} s "
              f"| {statistics.median(s.cpu):.2f} |")


if __name__ == "__main__":
    main()
