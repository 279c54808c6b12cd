"""Python client of verispec.v1: sync and asyncio wrappers around the generated stubs."""
