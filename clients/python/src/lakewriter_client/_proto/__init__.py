"""Generated protobuf/gRPC stubs (see clients/python/generate.sh)."""
