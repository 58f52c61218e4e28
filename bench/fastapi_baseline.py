"""The seed design, kept only as a benchmark baseline: FastAPI, one text per forward pass, fp32.

``BENCH_MODEL_DIR=<model directory> uvicorn bench.fastapi_baseline:app`` (``bench.run`` starts it)
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI, Request
from transformers import AutoModelForSequenceClassification, AutoTokenizer

MODEL_DIR = os.environ["BENCH_MODEL_DIR"]
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, use_safetensors=True).eval()
labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> dict:
    """Classify the text/plain body."""
    text = (await request.body()).decode("utf-8")
    with torch.inference_mode():
        probs = torch.softmax(model(**tokenizer(text, truncation=True, return_tensors="pt")).logits[0], dim=-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": labels[best], "score": probs[best], "probabilities": dict(zip(labels, probs, strict=True))}
