"""Generated protobuf and gRPC code of the livelens.v1 API (built by `make protos`)."""
