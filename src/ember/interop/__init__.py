"""Models in and out of other ecosystems: Hugging Face checkpoints (import and export) and ONNX (export)."""
