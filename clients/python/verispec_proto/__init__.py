"""The verispec.v1 contract's generated protobuf messages and gRPC stubs, under the import name
`verispec_proto.v1` (the protobuf package stays `verispec.v1`): `make protos` writes them."""
