"""A client of one TorchServe: its keys, readiness, and the management calls operators make.

Token authorization is on: TorchServe writes ``key_file.json`` (inference, management and API
keys) into its working directory at start, and issues a new key for an API on a call to its token
API. The client re-reads the file whenever it changes, so it always holds the current keys.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from project import MODEL_NAME

# The readiness probe's mark (handler/emotion_inputs.py PROBE_HEADER; serving/nginx.conf strips it
# from client requests).
PROBE_HEADER = "X-Emotion-Probe"

APIS = ("inference", "management", "API")


def read_key_file(path: Path) -> dict[str, dict]:
    """The entries of a TorchServe ``key_file.json`` by API (``{"key": ..., "expiration time": ...}``);
    empty while it is missing or half written. The one reader of that file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: entry for name, entry in data.items() if isinstance(entry, dict) and "key" in entry}


def read_keys(path: Path) -> dict[str, str]:
    """The keys in a TorchServe ``key_file.json`` by API; empty while it is missing or half written."""
    return {name: entry["key"] for name, entry in read_key_file(path).items()}


def key_expiry(path: Path, api: str = "inference") -> float | None:
    """When ``api``'s key in a TorchServe ``key_file.json`` expires (Unix seconds); None when the
    file, the key or a readable expiration time is missing."""
    entry = read_key_file(path).get(api) or {}
    try:
        return datetime.fromisoformat(str(entry["expiration time"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None


def auth_header(keys: dict[str, str], api: str) -> dict[str, str]:
    """``Authorization`` header for ``api`` (empty without token authorization)."""
    return {"Authorization": f"Bearer {keys[api]}"} if api in keys else {}


def count_ready(description: dict) -> int:
    """Workers in state READY in one version's description (the describe API's entry)."""
    return sum(isinstance(w, dict) and w.get("status") == "READY" for w in description.get("workers") or [])


class ManagementError(RuntimeError):
    """A management call TorchServe refused; carries its status and message."""


class TorchServeClient:
    """Calls to TorchServe's inference and management APIs with the current keys.

    Args:
        inference_url: ``http://host:port`` of the inference API.
        management_url: ``http://host:port`` of the management API.
        key_file: TorchServe's ``key_file.json`` (None: token authorization is off).
    """

    def __init__(self, inference_url: str, management_url: str, key_file: Path | None) -> None:
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.key_file = Path(key_file) if key_file else None
        self._keys: dict[str, str] = {}
        self._key_stamp: tuple[int, int] | None = None

    @property
    def keys(self) -> dict[str, str]:
        """The keys now in the key file (re-read when the file changes)."""
        if self.key_file is None:
            return {}
        try:
            stat = self.key_file.stat()
        except OSError:
            return self._keys
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._key_stamp:
            keys = read_keys(self.key_file)
            if keys:
                self._keys, self._key_stamp = keys, stamp
        return self._keys

    def headers(self, api: str = "inference") -> dict[str, str]:
        """The ``Authorization`` header for ``inference``, ``management`` or ``API`` calls."""
        return auth_header(self.keys, api)

    def predict(
        self, text: str, model: str = MODEL_NAME, timeout: float = 30, probe: bool = False
    ) -> requests.Response:
        """POST one text as ``text/plain`` to ``/predictions/<model>``.

        ``probe``: mark it as a readiness probe, which the handler answers without counting it in
        its prediction metrics, drift statistics and request log.
        """
        headers = {"Content-Type": "text/plain; charset=utf-8", **self.headers("inference")}
        if probe:
            headers[PROBE_HEADER] = "readiness"
        return requests.post(
            f"{self.inference_url}/predictions/{model}", data=text.encode(), headers=headers, timeout=timeout
        )

    def manage(self, method: str, path: str, timeout: float = 180, **params: Any) -> Any:
        """One management call; returns its JSON answer.

        Raises:
            ManagementError: TorchServe answered with anything but 200 or 202.
        """
        response = requests.request(
            method, f"{self.management_url}{path}", params=params, headers=self.headers("management"), timeout=timeout
        )
        if response.status_code not in (200, 202):
            raise ManagementError(f"{method} {path}: {response.status_code} {response.text.strip()}")
        return response.json()

    def describe(self, model: str = MODEL_NAME, version: str | None = "all", timeout: float = 10) -> list[dict]:
        """The model's versions with their workers (``GET /models/<model>[/<version>]``; None: the
        default version)."""
        return self.manage("GET", f"/models/{model}" + (f"/{version}" if version else ""), timeout=timeout)

    def default_version(self, model: str = MODEL_NAME, timeout: float = 10) -> dict:
        """The version ``/predictions/<model>`` serves: TorchServe describes its default version
        when the describe call names none (``GET /models/<model>``, a list of one entry).

        Raises:
            ManagementError, requests.RequestException: TorchServe refused or did not answer.
            ValueError: The answer is not one description.
        """
        versions = self.describe(model, version=None, timeout=timeout)
        if not isinstance(versions, list) or len(versions) != 1 or not isinstance(versions[0], dict):
            raise ValueError(f"describe {model}: expected one description, got {versions!r:.200}")
        return versions[0]

    def workers(self, model: str = MODEL_NAME) -> list[dict]:
        """Every worker of every version of ``model``."""
        return [w for version in self.describe(model) for w in version.get("workers", [])]

    def ready_workers(self, model: str = MODEL_NAME) -> int:
        """READY workers of the version ``/predictions/<model>`` serves (the default version; the
        workers of other versions serve nothing there); 0 when TorchServe does not answer."""
        try:
            return count_ready(self.default_version(model))
        except (requests.RequestException, ManagementError, ValueError):
            return 0

    def register(self, url: str, **params: Any) -> Any:
        """Register an archive of the model store (``POST /models?url=...``)."""
        return self.manage("POST", "/models", url=url, **params)

    def scale(self, model: str, workers: int, version: str | None = None, synchronous: bool = False) -> Any:
        """Set the worker count of ``model`` (min = max = ``workers``)."""
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self.manage("PUT", path, min_worker=workers, max_worker=workers, synchronous=str(synchronous).lower())

    def set_default(self, model: str, version: str) -> Any:
        """Make ``version`` the one ``/predictions/<model>`` serves."""
        return self.manage("PUT", f"/models/{model}/{version}/set-default")

    def unregister(self, model: str, version: str | None = None) -> Any:
        """Remove ``model`` (or one of its versions)."""
        return self.manage("DELETE", f"/models/{model}" + (f"/{version}" if version else ""), timeout=120)

    def rotate_key(self, api: str = "inference") -> str:
        """Have TorchServe issue a new key for ``inference`` or ``management`` (its token API,
        authorised by the API key); the old key stops working at once. Returns the new key.

        Raises:
            ManagementError: TorchServe refused (wrong API key, or token authorization is off).
        """
        old = self.keys.get(api)
        response = requests.get(
            f"{self.management_url}/token", params={"type": api}, headers=self.headers("API"), timeout=10
        )
        if response.status_code != 200:
            raise ManagementError(f"token API: {response.status_code} {response.text.strip()}")
        deadline = time.monotonic() + 5
        while self.keys.get(api) == old and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.keys[api]

    def wait_ready(self, model: str | None, timeout: float, process=None) -> float:
        """Wait until ``/ping`` is healthy and ``model`` (if given) has a READY worker.

        Args:
            process: A :class:`serving.process.ManagedProcess` to watch; its exit ends the wait.

        Returns:
            The seconds waited.

        Raises:
            TimeoutError: Not ready within ``timeout`` seconds.
            RuntimeError: ``process`` exited while waiting.
        """

        def ready() -> bool:
            try:
                ping = requests.get(f"{self.inference_url}/ping", headers=self.headers("inference"), timeout=2)
                healthy = ping.status_code == 200 and ping.json().get("status") == "Healthy"
            except (requests.RequestException, ValueError):
                return False
            return healthy and (model is None or self.ready_workers(model) > 0)

        if process is not None:
            return process.wait_until(ready, timeout, "ready")
        start = time.monotonic()
        while not ready():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"TorchServe at {self.inference_url} not ready after {timeout:.0f} s")
            time.sleep(0.25)
        return time.monotonic() - start
