"""What two or more services share, torch-free and importing nothing from the engine.

- `params`: what a request asks for (`SamplingParams`, `DraftConfig`) and its limits.
- `speedup`: when drafting pays: the one speedup model, batch buckets, layer modes.
- `api`: between the public API's messages and those parameters.
- `redis_schema`, `redis_acl`: the fleet's Redis keys, records and users.
- `tokens`, `internal_auth`, `tls`, `addresses`: credentials and transport security.
- `telemetry`, `metrics_push`: tracing and metrics export.
- `stubs`: generates the gRPC stubs in `services/gen/` from `protos/`.
"""
