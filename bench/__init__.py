"""Inference benchmark: in-process model, a one-text-per-pass FastAPI baseline, stock and tuned TorchServe."""
