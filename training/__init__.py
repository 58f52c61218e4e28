"""Training side of the emotion classifier: data loading, fine-tuning, evaluation."""
