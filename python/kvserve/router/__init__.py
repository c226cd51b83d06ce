"""`kvserve route`: one kvserve.v1 endpoint in front of a fleet of replicas.

discovery.py  where replicas are (flags, a watched file, DNS)
replicas.py   one connection per replica: health, load and round trip, model check
index_feed.py each replica's KV event stream applied to the Rust PrefixIndex
policy.py     which replica a request goes to (kv, round-robin, least-load, random)
service.py    the kvserve.v1 methods: route, retry before the first token, fleet load
metrics.py    Prometheus metrics of routing
app.py        assembly: gRPC server, health, reflection, auth, TLS, metrics, signals
"""
