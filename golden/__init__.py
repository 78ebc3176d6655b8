"""The float truth: real model and data preparation, tokenization, onnxruntime golden runs, vectors."""
