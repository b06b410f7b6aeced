"""edgeforge.export.onnx."""
