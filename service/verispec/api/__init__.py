"""The gRPC edge: servicer, request conversion and validation, status mapping, server wiring."""
