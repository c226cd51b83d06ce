"""A long simulation's memory is bounded by the live requests and the config, not by how
many requests came before (counted records, not RSS); Ctrl-C stops one cleanly with the
partial results written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvserve import _core
from kvserve.bench.workloads import Workload
from kvserve.sim.replica import ReplicaConfig
from kvserve.sim.routing import LeastLoad
from kvserve.sim.simulator import Simulator
from kvserve.sim.sources import WorkloadSource
from test_sim_units import gpu_like_profile


def drive(core: _core.Core, rng: np.random.Generator, start: int, n: int) -> int:
    """Adds n short requests (a few shared prefixes, so blocks are cached and evicted)
    four at a time and runs them to the end; the most requests live at once."""
    tokens = np.full(256, 5, np.int64)
    prefixes = [rng.integers(0, 32000, 64) for _ in range(8)]
    peak = 0
    for i in range(start, start + n):
        tail = rng.integers(0, 32000, int(rng.integers(8, 120)))
        prompt = np.concatenate([prefixes[i % 8], tail])
        core.add_request(f"r{i}", prompt, max_tokens=int(rng.integers(1, 12)),
                         ignore_eos=True)
        if i % 4 == 3:
            peak = max(peak, core.num_waiting + core.num_running)
            while core.has_unfinished():
                plan = core.schedule()
                core.commit(plan.id, tokens[:plan.num_samples])
    return peak


def test_core_records_are_bounded_by_config() -> None:
    core = _core.Core(num_gpu_blocks=64, finished_memory=100, evicted_memory=300)
    rng = np.random.default_rng(0)
    peak = drive(core, rng, 0, 1000)
    first = core.retained()
    peak = max(peak, drive(core, rng, 1000, 3000))
    last = core.retained()
    assert core.metrics()["evictions"] > 1000  # the evicted record was exercised
    # Once the caps are met nothing grows with the number of requests (the evicted map
    # and the cache move within their caps as digests come back).
    for k in ("finished", "finished_order", "evicted_fifo", "slots", "live_ids"):
        assert first[k] == last[k], k
    assert last["finished"] == 100 and last["finished_order"] <= 200
    assert last["evicted"] <= 300 and last["evicted_fifo"] <= 300
    assert last["live_ids"] == 0 and last["slots"] <= peak
    assert last["cached_digests"] <= 64 and last["kv_events"] == 0
    # The most recent ended request is still answered for; an old one is forgotten.
    assert core.request_stats("r3999")["state"] != "running"
    with pytest.raises(KeyError):
        core.request_stats("r0")


def test_core_record_bounds_are_config_fields() -> None:
    with pytest.raises(_core.ConfigError, match="finished_memory"):
        _core.Core(num_gpu_blocks=8, finished_memory=-1)
    with pytest.raises(_core.ConfigError, match="evicted_memory"):
        _core.Core(num_gpu_blocks=8, evicted_memory=-5)
    core = _core.Core(num_gpu_blocks=32, finished_memory=0, evicted_memory=0)
    drive(core, np.random.default_rng(1), 0, 200)
    r = core.retained()
    assert (r["finished"], r["evicted"], r["evicted_fifo"]) == (0, 0, 0)


def simulate(duration: float) -> Simulator:
    config = ReplicaConfig(num_gpu_blocks=96, num_host_blocks=0, max_num_seqs=16,
                           max_model_len=1024)
    w = Workload("shared-prefix", 32000, config.max_model_len, seed=3)
    sim = Simulator(gpu_like_profile(), config, 2, LeastLoad(), 0.01)
    sim.run(WorkloadSource(w, 60.0, None, duration, 3))
    return sim


def test_simulator_state_is_bounded_by_live_requests() -> None:
    short, long = simulate(2.0), simulate(8.0)
    assert long.stats.completed > 3 * short.stats.completed > 0
    for s in (short, long):
        assert len(s.series.times) <= s.series.max_points
        for r in s.replicas:
            assert not r.live and not r.coasting
    for a, b in zip(short.replicas, long.replicas, strict=True):
        # Per-handle arrays grow only when live handles collide, not with the trace.
        assert b._cap <= 4 * max(a._cap, 1024)
        ra, rb = a.core.retained(), b.core.retained()
        assert rb["slots"] <= 16 + 4096 and rb["live_ids"] == 0
        assert rb["finished"] <= 4096
        assert rb["evicted"] <= 4 * 96 and rb["evicted_fifo"] <= 4 * 96
        assert ra["evicted_fifo"] <= rb["evicted_fifo"]


def test_ctrl_c_stops_a_long_sim_with_partial_results(tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    gpu_like_profile().save(profile)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kvserve.cli", "sim", "--profile", str(profile),
           "--rate", "50", "--replicas", "4", "--duration", "100000", "--no-plots",
           "--out", str(out), "--max-model-len", "2048"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen = threading.Event()
    err: list[bytes] = []

    def read() -> None:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):  # type: ignore[attr-defined]
            err.append(chunk)
            if b"sim s" in b"".join(err):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # The progress bar shows once the simulation loop runs (imports take a while on a
        # loaded machine); then a little simulated time passes.
        assert seen.wait(120), b"".join(err).decode(errors="replace")[-2000:]
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    assert proc.returncode == 130, b"".join(err).decode(errors="replace")[-2000:]
    assert b"interrupted: partial results" in stdout
    doc = json.loads((out / "results.json").read_text())
    summary = doc.get("summary", doc)
    assert summary["interrupted"] is True
    assert 0 < summary["simulated_s"] < 100000
    assert summary["requests_sent"] > 0
