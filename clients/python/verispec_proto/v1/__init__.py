"""Generated protobuf messages and gRPC stubs of the verispec.v1 contract (`make protos`)."""
