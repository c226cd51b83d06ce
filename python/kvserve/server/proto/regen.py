"""Regenerate kvserve_pb2.py / .pyi from kvserve/v1/kvserve.proto.

Run with a grpcio-tools whose bundled protoc is 26.x (grpcio-tools 1.63), e.g.
    python -m venv /tmp/gen && /tmp/gen/bin/pip install grpcio-tools==1.63.2
    /tmp/gen/bin/python python/kvserve/server/proto/regen.py
so the committed code imports on protobuf >= 5.26 (see __init__.py). Use --any-protoc to
run with another version anyway (then raise the protobuf floor in pyproject.toml).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "kvserve/v1/kvserve.proto"
WANTED_PROTOC_MAJOR = 26
# protoc's style is not the project's; the generated files are never edited by hand
NOQA = (
    "# ruff: noqa\n# fmt: off\n"
    "# Written by kvserve/server/proto/regen.py; edit kvserve/v1/kvserve.proto.\n"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--any-protoc", action="store_true", help="skip the protoc version check")
    args = parser.parse_args(argv)
    from grpc_tools import protoc  # only needed here, not at run time

    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out}", f"--pyi_out={out}", PROTO])
        if rc != 0:
            print(f"protoc failed with status {rc}", file=sys.stderr)
            return 1
        generated = Path(out) / "kvserve" / "v1" / "kvserve_pb2.py"
        # "Protobuf Python Version: 5.26.1" is what libprotoc 26.1 writes
        match = re.search(r"Protobuf Python Version: (\d+)\.(\d+)", generated.read_text())
        protoc_major = int(match.group(2)) if match else -1
        if protoc_major != WANTED_PROTOC_MAJOR and not args.any_protoc:
            print(
                f"this protoc writes '{match.group(0) if match else 'unknown'}' gencode; "
                f"use grpcio-tools 1.63 (protoc {WANTED_PROTOC_MAJOR}.x) or --any-protoc",
                file=sys.stderr,
            )
            return 1
        for suffix in (".py", ".pyi"):
            text = generated.with_suffix(suffix).read_text()
            (HERE / f"kvserve_pb2{suffix}").write_text(NOQA + text)
    print(f"wrote {HERE / 'kvserve_pb2.py'} and .pyi")
    return 0


if __name__ == "__main__":
    sys.exit(main())
