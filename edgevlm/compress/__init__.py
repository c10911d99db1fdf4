"""Compression steps: reparameterization (torch) and quantization (on ONNX graphs)."""
