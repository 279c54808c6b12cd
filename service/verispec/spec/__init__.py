"""Speculative decoding: drafters propose, verification accepts a prefix exactly."""
