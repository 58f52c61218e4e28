"""Packing the trained model into a TorchServe archive and running TorchServe."""
