"""gRPC serving for kvserve: the `kvserve.v1` service, health, reflection and metrics.

`kvserve serve` / `kvserve-server` start it (see main.py); the proto file ships in
`kvserve/server/proto/kvserve/v1/kvserve.proto`.
"""
