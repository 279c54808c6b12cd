"""Paged KV cache bookkeeping: page pool and per-sequence page tables."""
