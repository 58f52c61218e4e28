"""Load tests for the served model (Locust)."""
