"""`kvserve generate`: streams the completion; errors are one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvserve.cli import main


def test_generate_streams_completion(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    rc = main(["generate", "--model", str(tiny_llama_dir), "--max-tokens", "6",
               "--kv-cache-memory", "1MiB", "--block-size", "4", "The quick brown fox"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("The quick brown fox") and len(out) > len("The quick brown fox\n")


def test_generate_chat_and_sampling_flags(tiny_llama_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(tiny_llama_dir), "--max-tokens", "8", "--chat",
            "--temperature", "0.9", "--seed", "5", "--kv-cache-memory", "1MiB", "hello"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def test_generate_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "kvserve.cli", "generate", "--model",
                           str(tmp_path / "missing"), "hi"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 2
    assert "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_import_kvserve_stays_light() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    code = ("import sys, kvserve; assert 'torch' not in sys.modules; "
            "assert kvserve.SamplingParams(temperature=0).greedy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_generate_default_model(capsys: pytest.CaptureFixture[str]) -> None:
    from kvserve.default_model import default_model_path

    try:
        default_model_path()
    except RuntimeError as exc:
        pytest.skip(f"default model unavailable: {exc}")
    rc = main(["generate", "--max-tokens", "6", "--kv-cache-memory", "16MiB",
               "--max-model-len", "256", "The capital of France is"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out
