"""Model runtimes behind one seam: forward k+1 tokens, roll the cache back, free it."""
