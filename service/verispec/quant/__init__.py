"""Quantized weights on CPU: GGUF blocks loaded losslessly into layers on torch's int4 kernel."""
