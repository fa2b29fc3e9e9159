"""Serving: the ONNX graph, export and its parity check, loading any model, predictions."""
