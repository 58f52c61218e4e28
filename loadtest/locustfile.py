"""Locust load test for ``POST /predictions/<model>``.

Users send validation texts, as ``text/plain`` or JSON, and the stepped shape
from ``loadtest/config.yaml`` sets how many users run when. Run it through
``python -m loadtest.run`` (reports, plot, pass/fail) or directly with
``locust -f loadtest/locustfile.py``.
"""

from __future__ import annotations

import json
import random

from locust import LoadTestShape, between, task
from locust.contrib.fasthttp import FastHttpUser

from loadtest.settings import LoadTestSettings, inference_key
from project import LABELS
from serving.emotion_client import EmotionAPIError, Prediction, read_answer

SETTINGS = LoadTestSettings.load()
TEXTS = SETTINGS.texts()
KEY = inference_key()
AUTH = {"Authorization": f"Bearer {KEY}"} if KEY else {}


class EmotionUser(FastHttpUser):
    """A client that sends one text per request, with a short think time."""

    host = SETTINGS.host
    wait_time = between(0.01, 0.05)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.path = f"/predictions/{SETTINGS.model}"

    def _check(self, response) -> None:
        """Read the answer as the project's client does (``serving.emotion_client``): one
        contract for what a good answer is; Locust's own HTTP client only carries the bytes."""
        try:
            answer = Prediction.from_json(read_answer(response.status_code, response.text or ""))
        except EmotionAPIError as err:
            response.failure(str(err)[:200])
            return
        except (KeyError, TypeError):
            response.failure(f"unexpected body: {response.text[:200]}")
            return
        if len(answer.probabilities) != len(LABELS):
            response.failure(f"unexpected body: {response.text[:200]}")

    @task
    def predict(self) -> None:
        text = self.rng.choice(TEXTS)
        if self.rng.random() < SETTINGS.json_share:
            body, content_type, name = json.dumps({"text": text}), "application/json", "predict json"
        else:
            body, content_type, name = text, "text/plain", "predict text"
        with self.client.post(
            self.path, data=body, headers={"Content-Type": content_type, **AUTH}, name=name, catch_response=True
        ) as response:
            self._check(response)


class SteppedShape(LoadTestShape):
    """Hold each configured number of users for its duration, then stop."""

    def tick(self):
        elapsed = self.get_run_time()
        for step in SETTINGS.steps:
            elapsed -= float(step["seconds"])
            if elapsed < 0:
                return int(step["users"]), SETTINGS.spawn_rate
        return None
