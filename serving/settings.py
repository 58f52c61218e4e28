"""The service's settings, typed, each with its default and its environment override.

:class:`ServeSettings` is every setting of ``python -m serving`` (``make serve``, the image's
entrypoint): its fields are the command line's flags (``--model-store``), their defaults are the
fields' defaults, and ``EMOTION_SERVE_<FIELD>`` (``EMOTION_SERVE_PORT=9000``) overrides a default
for a process started without the flag, as a container's environment does. Precedence: flag,
then environment, then default. :meth:`ServeSettings.gateway` hands the gateway its share
(:class:`GatewaySettings`), which also validates it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from project import (
    GATEWAY_METRICS_PORT,
    GATEWAY_PORT,
    HANDLER_DIR,
    LOOPBACK,
    MODEL_NAME,
    MODEL_STORE,
    SERVE_DIR,
    SERVED_MODELS,
)
from serving.feedback import ITEMS_PER_S as FEEDBACK_ITEMS_PER_S
from serving.feedback import QUALITY_WINDOW, RETENTION_DAYS
from serving.health import GOLDEN_MAX_AGE, UNREADY_EXIT

MODEL_CONFIG = HANDLER_DIR / "model-config.yaml"
ENV_PREFIX = "EMOTION_SERVE_"


# Seconds the retries of one request may go on past the first attempt's timeout
# (proxy_next_upstream_timeout is attempt_timeout plus this): an attempt that timed out is
# retried once, a second one is not (for attempt timeouts over this margin).
RETRY_MARGIN = 5
# The route of a model name, as the gateway's prediction location matches it.
MODEL_ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def response_timeout(model_config: Path = MODEL_CONFIG) -> int:
    """TorchServe's ``responseTimeout`` (seconds) from the model config; 120, its default, if unset."""
    return int((yaml.safe_load(model_config.read_text()) or {}).get("responseTimeout", 120))


def max_text_chars(model_config: Path = MODEL_CONFIG) -> int:
    """The handler's ``max_text_chars`` from the model config; 2000, its default, if unset."""
    handler = (yaml.safe_load(model_config.read_text()) or {}).get("handler") or {}
    return int(handler.get("max_text_chars", 2000))


@dataclass(frozen=True)
class GatewaySettings:
    """How the gateway listens, retries and limits.

    Attributes:
        host: Address to listen on: 127.0.0.1, or 0.0.0.0 inside a container.
        port: Port of the gateway.
        metrics_port: Port of its Prometheus metrics.
        metrics_host: Address of the metrics port: 127.0.0.1, or 0.0.0.0 in a Kubernetes pod
            whose network policy admits only the metrics collector.
        tries: Attempts per request (first try plus retries) for answers from a removed worker,
            refused connections and unanswered attempts; no retry starts later than
            ``attempt_timeout`` plus ``RETRY_MARGIN`` seconds after the first; after a 507, one
            attempt more.
        attempt_timeout: Seconds without an answer before an attempt is given up; default
            TorchServe's ``responseTimeout``.
        rate: Requests per second accepted from one client address (beyond ``burst``: 429).
        burst: Requests above ``rate`` one client may send at once.
        connections: Open connections allowed from one client address.
        key_rate: Requests per second accepted with one gateway key, from all its addresses
            together (beyond ``key_burst``: 429).
        key_burst: Requests above ``key_rate`` one key may send at once.
        retry_after: Seconds in the ``Retry-After`` header of 429 and 503 answers.
        trusted_proxies: Addresses or networks of proxies in front (the VM's TLS nginx on
            127.0.0.1, a load balancer's range) whose ``X-Forwarded-For`` names the client: the
            per-client limits then count each client, not the proxy. Empty: the peer address.
        model: The served model: on its route (``/predictions/<model>``) TorchServe's 404
            means the model is being unregistered or registered again, a 503 ``NotReady``.
        feedback_port: Loopback port of the feedback service (``serving.feedback``) behind
            ``POST /feedback``; None: ``/feedback`` answers 404.
        feedback_rate: Feedback requests per second accepted from one client address (a zone
            of their own, apart from the predictions' limits).
        feedback_burst: Feedback requests above ``feedback_rate`` one client may send at once.
        explain_port: Loopback port of the explanation service (``serving.explain``) behind
            ``POST /explanations/<model>``; None: that path answers 404.
        explain_rate: Explanations per second accepted from one client address (a zone of
            their own: each costs one forward pass per word).
        explain_burst: Explanations above ``explain_rate`` one client may send at once.
        request_deadline: Seconds from a request's start within which its headers and its whole
            body must have arrived (the headers alone: within 10 s, nginx's
            ``client_header_timeout``); past it, a 408 and the connection is closed, however
            steadily a slow client sends.
    """

    host: str = LOOPBACK
    port: int = GATEWAY_PORT
    metrics_port: int = GATEWAY_METRICS_PORT
    metrics_host: str = LOOPBACK
    tries: int = 3
    attempt_timeout: int | None = None
    rate: int = 1000
    burst: int = 2000
    connections: int = 64
    key_rate: int = 2000
    key_burst: int = 4000
    retry_after: int = 1
    model: str = MODEL_NAME
    trusted_proxies: tuple[str, ...] = ()
    feedback_port: int | None = None
    feedback_rate: int = 100
    feedback_burst: int = 200
    explain_port: int | None = None
    explain_rate: int = 2
    explain_burst: int = 4
    request_deadline: int = 20

    def longest_request(self) -> int:
        """Seconds the gateway may keep one request: attempts start for up to the attempt
        timeout plus ``RETRY_MARGIN`` after the first, the last may take the attempt timeout, and a
        507 then gets one attempt more (3 x responseTimeout + 5 s = 95 s as shipped)."""
        timeout = self.attempt_timeout or response_timeout()
        return 3 * timeout + RETRY_MARGIN

    def __post_init__(self) -> None:
        for name in (
            "port",
            "metrics_port",
            "tries",
            "rate",
            "burst",
            "connections",
            "key_rate",
            "key_burst",
            "retry_after",
            "feedback_rate",
            "feedback_burst",
            "explain_rate",
            "explain_burst",
            "request_deadline",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"gateway {name} must be >= 1, not {getattr(self, name)}")
        if self.attempt_timeout is not None and self.attempt_timeout < 1:
            raise ValueError(f"gateway attempt_timeout must be >= 1, not {self.attempt_timeout}")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"gateway trusted proxy must be an address or network, not {proxy!r}") from None
        if not MODEL_ROUTE_NAME.fullmatch(self.model):
            raise ValueError(f"gateway model must be a name matching {MODEL_ROUTE_NAME.pattern}, not {self.model!r}")


def _flag(help_text: str, **extra: Any) -> dict[str, Any]:
    return {"help": help_text, **extra}


@dataclass(frozen=True)
class ServeSettings:
    """Every setting of ``python -m serving`` (see the module docstring); ``help`` is the flag's."""

    workdir: Path = field(default=SERVE_DIR, metadata=_flag("folder of TorchServe's and nginx's files, keys, logs"))
    model_store: Path = field(default=MODEL_STORE, metadata=_flag("folder holding the archives"))
    models: str = field(default=SERVED_MODELS, metadata=_flag("TorchServe's --models"))
    ts_free_ports: bool = field(default=False, metadata=_flag("TorchServe on free loopback ports"))
    keys_file: Path | None = field(default=None, metadata=_flag("gateway keys (default <workdir>/keys.json)"))
    no_keys: bool = field(default=False, metadata=_flag("no gateway key (behind another authenticator)"))
    host: str = field(default=GatewaySettings.host, metadata=_flag("gateway address (0.0.0.0 in a container)"))
    port: int = field(default=GatewaySettings.port, metadata=_flag("gateway port"))
    metrics_port: int = field(default=GatewaySettings.metrics_port, metadata=_flag("port of the gateway's metrics"))
    metrics_host: str = field(default=GatewaySettings.metrics_host, metadata=_flag("address of the metrics port"))
    tries: int = field(default=GatewaySettings.tries, metadata=_flag("attempts per request"))
    attempt_timeout: int | None = field(
        default=GatewaySettings.attempt_timeout, metadata=_flag("default: responseTimeout")
    )
    rate: int = field(default=GatewaySettings.rate, metadata=_flag("requests/s per client address"))
    burst: int = field(
        default=GatewaySettings.burst, metadata=_flag("requests above the rate one client may send at once")
    )
    connections: int = field(default=GatewaySettings.connections, metadata=_flag("connections per client address"))
    key_rate: int = field(default=GatewaySettings.key_rate, metadata=_flag("requests/s per gateway key"))
    key_burst: int = field(
        default=GatewaySettings.key_burst, metadata=_flag("requests above key_rate one key may send at once")
    )
    trusted_proxy: tuple[str, ...] = field(
        default=(),
        metadata=_flag("a proxy in front (address or network; repeatable) whose X-Forwarded-For names the client"),
    )
    golden_file: Path | None = field(
        default=None,
        metadata=_flag("readiness: a golden.json to compare answers with (default: the one in the served archive)"),
    )
    golden_max_age: float = field(
        default=GOLDEN_MAX_AGE,
        metadata=_flag("readiness: seconds a good golden verdict holds while golden checks get busy answers or none"),
    )
    unready_exit: float = field(
        default=UNREADY_EXIT,
        metadata=_flag("run: exit 1 after this many seconds not ready, once it was ready (0: never)"),
    )
    feedback_db: Path | None = field(
        default=None, metadata=_flag("POST /feedback: its SQLite store (default <workdir>/feedback.sqlite)")
    )
    feedback_rate: int = field(
        default=GatewaySettings.feedback_rate, metadata=_flag("POST /feedback: requests/s per client address")
    )
    feedback_burst: int = field(
        default=GatewaySettings.feedback_burst, metadata=_flag("POST /feedback: requests above its rate at once")
    )
    explain_rate: int = field(
        default=GatewaySettings.explain_rate, metadata=_flag("POST /explanations: requests/s per client address")
    )
    explain_burst: int = field(
        default=GatewaySettings.explain_burst, metadata=_flag("POST /explanations: requests above its rate at once")
    )
    request_deadline: int = field(
        default=GatewaySettings.request_deadline,
        metadata=_flag("seconds for a request's headers and body to arrive (past them: 408)"),
    )
    feedback_retention_days: float = field(
        default=RETENTION_DAYS, metadata=_flag("POST /feedback: days an answer may get its label (410 after)")
    )
    quality_window: int = field(
        default=QUALITY_WINDOW, metadata=_flag("live quality metrics: labelled answers per model version they cover")
    )
    feedback_items_per_s: float = field(
        default=FEEDBACK_ITEMS_PER_S, metadata=_flag("POST /feedback: labels handled per second at most (paced)")
    )
    drain: float = field(default=2.0, metadata=_flag("seconds between not-ready and stopping"))
    timeout: float = field(default=240, metadata=_flag("start, stop: seconds to wait"))
    grace: float = field(default=3600, metadata=_flag("rotate-key: seconds the old keys stay valid"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeSettings:
        """The defaults, with ``EMOTION_SERVE_<FIELD>`` overrides from ``environ`` (default: the process').

        Raises:
            ValueError: An override is not a value of its field's type.
        """
        environ = os.environ if environ is None else environ
        values = {}
        for item in dataclasses.fields(cls):
            name = ENV_PREFIX + item.name.upper()
            if name in environ:
                kind, many = field_type(item)
                try:
                    if many:
                        values[item.name] = tuple(
                            parse_value(kind, part.strip()) for part in environ[name].split(",") if part.strip()
                        )
                    else:
                        values[item.name] = parse_value(kind, environ[name])
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None
        try:
            return cls(**values)
        except ValueError as err:
            overrides = ", ".join(ENV_PREFIX + name.upper() for name in values)
            raise ValueError(f"{err} (environment overrides: {overrides})") from None

    def __post_init__(self) -> None:
        self.gateway()  # raises ValueError for a port, limit or proxy the gateway cannot take
        for name in ("golden_max_age", "unready_exit", "drain", "timeout", "grace"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.feedback_retention_days <= 0 or self.quality_window < 1 or self.feedback_items_per_s <= 0:
            raise ValueError("feedback_retention_days and feedback_items_per_s must be > 0 and quality_window >= 1")

    def gateway(self, model: str = MODEL_NAME) -> GatewaySettings:
        """The gateway's settings (validated there)."""
        return GatewaySettings(
            host=self.host,
            port=self.port,
            metrics_port=self.metrics_port,
            metrics_host=self.metrics_host,
            tries=self.tries,
            attempt_timeout=self.attempt_timeout,
            rate=self.rate,
            burst=self.burst,
            connections=self.connections,
            key_rate=self.key_rate,
            key_burst=self.key_burst,
            trusted_proxies=tuple(self.trusted_proxy),
            model=model,
            feedback_rate=self.feedback_rate,
            feedback_burst=self.feedback_burst,
            explain_rate=self.explain_rate,
            explain_burst=self.explain_burst,
            request_deadline=self.request_deadline,
        )


def field_type(item: dataclasses.Field) -> tuple[type, bool]:
    """The type of a field's values, and whether the field holds several (``(int, False)`` for
    ``int | None``, ``(str, True)`` for ``tuple[str, ...]``)."""
    hint = typing.get_type_hints(ServeSettings)[item.name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def parse_value(kind: type, text: str) -> Any:
    """``text`` as a value of ``kind`` (booleans: 1/0, true/false, yes/no, on/off; tuples: comma-separated).

    Raises:
        ValueError: It is not one.
    """
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean (1/0, true/false), not {text!r}")
    return kind(text)
