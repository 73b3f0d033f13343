"""The local inference server: KServe v2 / Open Inference Protocol over HTTP (see docs/http-api.md)."""
