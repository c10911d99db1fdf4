"""Compression steps: reparameterization and distillation (torch); quantization, the attention rewrite and the shared
ONNX save/inspect helpers (onnx_io) on ONNX graphs."""
