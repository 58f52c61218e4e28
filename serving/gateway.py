"""The nginx gateway in front of TorchServe's inference API (its template: ``serving/nginx.conf``).

:func:`render` fills the template from :class:`serving.settings.GatewaySettings`.
:class:`Gateway` runs nginx with :class:`serving.process.ManagedProcess` and exposes what the
stack's supervisor changes while it runs: the gateway keys and TorchServe's key (included files,
applied with a graceful reload), the drain (likewise: every answer closes its connection), the
health files that ``/ready`` and the prediction route read, and log reopening after rotation.
:func:`nginx_workers` and :func:`wait_reloaded` tell when a reload has taken over.
``python -m serving`` runs it together with TorchServe (``serving.stack``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import psutil

from project import LABELS, LOOPBACK, VERSION, handler_module
from serving import openapi
from serving.process import ManagedProcess
from serving.settings import MODEL_ROUTE_NAME, RETRY_MARGIN, GatewaySettings, max_text_chars, response_timeout

TEMPLATE = Path(__file__).with_name("nginx.conf")
MAX_TEXTS = handler_module("emotion_inputs").MAX_TEXTS
# Seconds to wait for nginx's new workers after a reload.
RELOAD_TIMEOUT = 5.0

# Debian's nginx modules (libnginx-mod-http-lua): Lua reads bodies against the request deadline.
NGINX_MODULES = Path("/usr/lib/nginx/modules")
LUA_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")
# Seconds one read of a request's body may wait (nginx's client_body_timeout, for the Lua reader).
BODY_READ_TIMEOUT = 10
# The statuses a route's checks refuse with (serving/nginx.conf, /_refuse/<status>).
REFUSALS = (400, 401, 404, 405, 411, 415, 503)
# The bodies of /live and /ready, served from files (after the limits, as every answer).
HEALTH_ANSWERS = {"live.json": '{"status": "alive"}\n', "ready.json": '{"status": "ready"}\n'}
# Error answers carry their message twice: as "message", and as "error", the Open Inference
# Protocol's field (its clients read nothing else). Added when the template is rendered.
MESSAGE_FIELD = re.compile(r'"message": ("(?:[^"\\]|\\.)*")')

# The rollout's routes (serving.rollout writes them and reloads nginx) and the shadow's log.
ROLLOUT_CONF = "rollout.conf"
ROLLOUT_MIRROR_CONF = "rollout_mirror.conf"  # in the prediction route: the mirror, while a rollout shadows
SHADOW_LOG = "shadow.log"
ROLLOUT_VARIABLES = ("$rollout_version", "$rollout_shadow")

# The message of a refusal for a missing or wrong key.
UNAUTHORIZED = "send Authorization: Bearer <key>; a key from your operator (python -m serving key)"
CHUNKED = "send the body with a Content-Length (a chunked body is not read)"

# Seconds nginx keeps an idle client connection open (keepalive_timeout), except while draining.
KEEPALIVE_TIMEOUT = 30


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")


def render(upstream: str, prefix: Path, settings: GatewaySettings) -> str:
    """The gateway's nginx config for ``upstream`` (``host:port`` of TorchServe's inference API).

    Raises:
        ValueError: ``upstream`` is not ``host:port``.
    """
    _check_address(upstream)
    servers = "\n".join(f"        server {upstream} max_fails=0;" for _ in range(settings.tries))
    attempt_timeout = settings.attempt_timeout or response_timeout()
    values = {
        # Started as root, nginx runs its worker as "nobody", which could not read the health
        # files in the stack's folder: keep the worker under the user that runs the stack.
        "USER": f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else "",
        "SERVERS": servers,
        "REAL_IP": "".join(f"\n    set_real_ip_from {proxy};" for proxy in settings.trusted_proxies)
        + ("\n    real_ip_header X-Forwarded-For;\n    real_ip_recursive on;" if settings.trusted_proxies else ""),
        "LISTEN": f"{settings.host}:{settings.port}",
        "METRICS_LISTEN": f"{settings.metrics_host}:{settings.metrics_port}",
        "PREFIX": str(prefix),
        "HEALTH": str(prefix / "health"),
        "MODEL": settings.model,
        "MAX_TEXT_CHARS": str(max_text_chars()),
        "TRIES": str(settings.tries),
        "ATTEMPT_TIMEOUT": str(attempt_timeout),
        "RETRY_WINDOW": str(attempt_timeout + RETRY_MARGIN),
        "RATE": str(settings.rate),
        "BURST": str(settings.burst),
        "CONNECTIONS": str(settings.connections),
        "KEY_RATE": str(settings.key_rate),
        "KEY_BURST": str(settings.key_burst),
        "RETRY_AFTER": str(settings.retry_after),
        "FEEDBACK_RATE": str(settings.feedback_rate),
        "FEEDBACK_BURST": str(settings.feedback_burst),
        "FEEDBACK": feedback_route(settings.feedback_port),
        "EXPLAIN_RATE": str(settings.explain_rate),
        "EXPLAIN_BURST": str(settings.explain_burst),
        "REQUEST_DEADLINE": str(settings.request_deadline),
        "BODY_READ_TIMEOUT": str(BODY_READ_TIMEOUT),
        "REFUSALS": refusal_locations(),
        "MODULES": "\n".join(f"load_module {path};" for path in lua_modules()),
    }
    # The explanations' route first: it holds placeholders of its own.
    text = TEMPLATE.read_text().replace("@@EXPLAIN@@", explain_route(settings.explain_port))
    for name, value in values.items():
        text = text.replace(f"@@{name}@@", value)
    return MESSAGE_FIELD.sub(r'"message": \1, "error": \1', text)


def oip_answers(model: str) -> dict[str, str]:
    """The Open Inference Protocol v2's fixed answers, served from files: health, the server's
    metadata and the model's (its input and outputs, :func:`emotion_engine.oip_answer`)."""
    labels = list(LABELS)
    metadata = {
        "name": model,
        "platform": "pytorch_torchserve",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)]},
            {"name": "error", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"labels": labels, "max_texts": MAX_TEXTS},
    }
    server = {"name": model, "version": VERSION, "extensions": ["binary_tensor_data"]}
    answers = {
        "v2_live.json": {"live": True},
        "v2_ready.json": {"ready": True},
        "v2_server.json": server,
        "v2_model.json": metadata,
        "v2_model_ready.json": {"name": model, "ready": True},
    }
    return {name: json.dumps(body) + "\n" for name, body in answers.items()}


def lua_modules(directory: Path = NGINX_MODULES) -> list[Path]:
    """nginx's dynamic modules the gateway loads: Lua (and NDK, which it needs), which reads a
    request's body against its deadline.

    Raises:
        FileNotFoundError: a module is missing (Debian's libnginx-mod-http-lua is not installed).
    """
    paths = [directory / name for name in LUA_MODULES]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the gateway needs nginx's Lua module: {', '.join(missing)} missing "
            "(apt-get install libnginx-mod-http-lua, or make system-deps)"
        )
    return paths


def refusal_locations() -> str:
    """The locations that answer a route's refusals (``/_refuse/<status>``) after the limits."""
    blocks = []
    for status in REFUSALS:
        blocks.append(
            f"        location = /_refuse/{status} {{\n"
            '            if ($refusal = "") {\n'
            "                set $refusal $not_found;\n"
            "                rewrite ^ /_refuse/404 last;\n"
            "            }\n"
            f"            try_files /.none ={status};\n"
            f"            error_page {status} @refusal;\n"
            "            error_page 429 = @too_many;\n"
            "        }"
        )
    return "\n".join(blocks)


def rollout_conf(
    candidate: str | None = None, canary_percent: float = 0, shadow_percent: float = 0, relay: str | None = None
) -> str:
    """The gateway's routes during a rollout (``rollout.conf``, at nginx's ``http`` level):
    ``canary_percent`` of the served model's requests go to version ``candidate``, and
    ``shadow_percent`` of the rest are mirrored to ``relay`` (``host:port`` of the rollout's
    :class:`serving.shadow.ShadowRelay`). No candidate: no rollout.

    Raises:
        ValueError: a share outside [0, 100], a candidate that is no version name, or a shadow
            without a relay address.
    """
    for name, share in (("canary", canary_percent), ("shadow", shadow_percent)):
        if not 0 <= share <= 100:
            raise ValueError(f"rollout {name} share must be between 0 and 100 %, not {share}")
    if candidate is None:
        maps = "".join(f'map $request_id {name} {{\n    default "";\n}}\n' for name in ROLLOUT_VARIABLES)
        return maps + relay_upstream(None)
    if not MODEL_ROUTE_NAME.fullmatch(candidate):
        raise ValueError(
            f"rollout candidate must be a version name matching {MODEL_ROUTE_NAME.pattern}, not {candidate!r}"
        )
    if shadow_percent > 0 and (relay is None or not re.fullmatch(r"127\.0\.0\.1:\d{1,5}", relay)):
        raise ValueError(f"a rollout's shadow needs its relay's loopback address, not {relay!r}")

    def split(variable: str, salt: str, percent: float, value: str) -> str:
        if percent <= 0:
            return f'map $request_id {variable} {{\n    default "";\n}}\n'
        if percent >= 100:
            return f'map $request_id {variable} {{\n    default "{value}";\n}}\n'
        return f'split_clients "${{request_id}}{salt}" {variable} {{\n    {percent:g}% "{value}";\n    * "";\n}}\n'

    return (
        split("$rollout_version", "canary", canary_percent, f"/{candidate}")
        + split("$rollout_shadow", "shadow", shadow_percent, candidate)
        + relay_upstream(relay)
    )


def mirror_conf(shadow: bool) -> str:
    """The prediction route's mirror directive: only while a rollout shadows."""
    return "mirror /_shadow;\n" if shadow else "# no rollout shadows requests now\n"


def relay_upstream(relay: str | None) -> str:
    """The upstream of the shadow's mirrors, with kept-alive connections: the relay, or (no
    shadow) the discard port, which no request reaches (the shadow's location answers 204)."""
    return f"upstream rollout_relay {{\n    server {relay or '127.0.0.1:9'};\n    keepalive 8;\n}}\n"


def _not_served(service: str) -> str:
    """A route's body where no ``service`` runs behind the gateway: the NotFound refusal."""
    return (
        f'            set $refusal \'{{"code": 404, "type": "NotFound", "message": "no {service} '
        'runs behind this gateway", "request_id": "$emotion_request_id"}\\n\';\n'
        "            rewrite ^ /_refuse/404 last;"
    )


def _to_service(port: int, read_timeout: int, unavailable: str) -> list[str]:
    """The lines that pass a request on to a loopback service of the stack: the client's key stops
    here, the request's id goes with it, and only the gateway's own failures are intercepted (the
    service's 4xx pass as they are); no answer is ``unavailable``'s 503."""
    return [
        f"proxy_pass http://{LOOPBACK}:{port};",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        'proxy_set_header Authorization "";  # the client key stops here',
        "proxy_set_header X-Request-ID $emotion_request_id;",
        "proxy_hide_header X-Request-ID;",
        "proxy_connect_timeout 2s;",
        f"proxy_read_timeout {read_timeout}s;",
        "proxy_intercept_errors on;",
        "error_page 408 /_error/408;",
        f"error_page 502 504 = {unavailable};",
        "error_page 413 = @too_large;",
        "error_page 429 = @too_many;",
    ]


def _indented(lines: list[str]) -> str:
    return "\n".join("            " + line for line in lines)


def feedback_route(port: int | None) -> str:
    """The body of the ``/feedback`` location: to the feedback service on ``port`` (the stack's
    service, ``serving.feedback_service``), or a 404 where none runs."""
    if port is None:
        return _not_served("feedback service")
    # An answer to 1,000 items is about 100 KB: passed on as it comes, not spilled to a file.
    return _indented([*_to_service(port, 30, "@feedback_unavailable"), "proxy_buffering off;"])


def explain_route(port: int | None) -> str:
    """The body of the ``/explanations/<model>`` location: its checks (method, key, a body of known
    length), its own rate and the body's deadline, then the explanation service on ``port``
    (``serving.explain``); without one, the path is not served (404, before any check)."""
    if port is None:
        return _not_served("explanation service")
    checks = [
        ("$request_method != POST", 405, "MethodNotAllowed", "explanations are POST /explanations/<model>"),
        ("$client_authorized = 0", 401, "Unauthorized", UNAUTHORIZED),
        ("$http_transfer_encoding", 411, "LengthRequired", CHUNKED),
    ]
    lines = []
    for condition, status, kind, message in checks:
        body = f'{{"code": {status}, "type": "{kind}", "message": "{message}", "request_id": "$emotion_request_id"}}'
        refusal = f"    set $refusal '{body}\\n';"
        lines += [f"if ({condition}) {{", refusal, f"    rewrite ^ /_refuse/{status} last;", "}"]
    lines += [
        # Its own rate (in place of the server's two), the server's connection limit.
        "limit_req zone=explain_rate burst=@@EXPLAIN_BURST@@ nodelay;",
        "access_by_lua_block { read_body(@@REQUEST_DEADLINE@@, @@BODY_READ_TIMEOUT@@) }",
        *_to_service(port, 60, "@explain_unavailable"),
    ]
    return _indented(lines)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable and writable by its owner only (also an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def client_keys_map(keys: list[str] | None) -> str:
    """nginx ``map`` setting ``$client_authorized`` to 1 for a valid ``Bearer`` key (None: keys
    off, behind another authenticator; an empty list: no key is valid, every request is refused)."""
    lines = ["map $http_authorization $client_authorized {"]
    if keys is None:
        lines.append("    default 1;")
    else:
        lines.append("    default 0;")
        # Gateway keys are URL-safe base64: no character needs escaping in the pattern. The
        # scheme's name is case-insensitive, the key is not.
        lines += [f'    "~^(?i:bearer) +{key} *$" 1;' for key in keys]
    return "\n".join([*lines, "}"]) + "\n"


def upstream_auth_map(key: str | None) -> str:
    """nginx ``map`` setting ``$upstream_authorization`` to TorchServe's inference key."""
    value = f"Bearer {key}" if key else ""
    return f'map $host $upstream_authorization {{\n    default "{value}";\n}}\n'


def keepalive_conf(draining: bool) -> str:
    """nginx ``keepalive_timeout``: 0 while draining (every answer carries ``Connection: close``)."""
    return f"keepalive_timeout {'0' if draining else f'{KEEPALIVE_TIMEOUT}s'};\n"


class Gateway:
    """An nginx process with its config, logs, health files and temp folders under ``workdir``.

    Args:
        upstream: TorchServe's inference address, ``host:port``.
        workdir: Folder for the rendered config, logs, health files and nginx temp files.
        settings: Listening address, retries and limits.
        client_keys: Gateway keys clients may send (None: no key needed).
        upstream_key: TorchServe's inference key (None: TorchServe runs without token auth).
    """

    def __init__(
        self,
        upstream: str,
        workdir: Path,
        settings: GatewaySettings | None = None,
        client_keys: list[str] | None = None,
        upstream_key: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.settings = settings or GatewaySettings()
        self.config = render(upstream, self.workdir, self.settings)
        self.client_keys = client_keys
        self.upstream_key = upstream_key
        self.draining = False
        self.process: ManagedProcess | None = None
        self._reloading = threading.Lock()  # the supervisor's key changes and the drain

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.settings.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.settings.metrics_port}/metrics"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def health_dir(self) -> Path:
        return self.workdir / "health"

    def set_health(self, up: bool, ready: bool) -> None:
        """Open or close the prediction route (``up``) and ``/ready`` (``ready``)."""
        for name, state in (("up", up), ("ready", ready)):
            path = self.health_dir / name
            if state:
                path.touch()
            else:
                path.unlink(missing_ok=True)

    def _write_includes(self) -> None:
        # The key files hold secrets: the owner's only (the folder too, see start).
        write_private(self.workdir / "client_keys.conf", client_keys_map(self.client_keys))
        write_private(self.workdir / "upstream_auth.conf", upstream_auth_map(self.upstream_key))
        (self.workdir / "keepalive.conf").write_text(keepalive_conf(self.draining))

    def _reload(self) -> None:
        """Rewrite the included files and reload gracefully (connections in flight finish on the
        old config; nginx closes the idle ones)."""
        self._write_includes()
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)

    def update_keys(self, client_keys: list[str] | None, upstream_key: str | None) -> bool:
        """Apply new keys with a graceful reload (connections in flight finish on the old config).

        Returns whether anything changed.
        """
        with self._reloading:
            if (client_keys, upstream_key) == (self.client_keys, self.upstream_key):
                return False
            self.client_keys, self.upstream_key = client_keys, upstream_key
            self._reload()
        return True

    def drain(self) -> bool:
        """From now on close every client connection after its answer (``Connection: close``),
        with a graceful reload, so that clients on kept-alive connections reconnect (to another
        replica behind a load balancer) instead of meeting :meth:`stop`. Until the next start.

        Returns whether anything changed.
        """
        with self._reloading:
            if self.draining:
                return False
            self.draining = True
            self._reload()
        return True

    def reopen_logs(self) -> None:
        """Have nginx reopen its log files (after they were renamed by rotation)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGUSR1)

    def start(self, timeout: float = 15) -> None:
        """Start nginx and wait until it accepts connections.

        Raises:
            FileNotFoundError: nginx is not installed.
            RuntimeError: nginx exited (for example, the port is taken).
        """
        binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
        if binary is None:
            raise FileNotFoundError("nginx is not installed (make system-deps, or apt-get install nginx)")
        self.health_dir.mkdir(parents=True, exist_ok=True)
        answers = self.workdir / "answers"
        answers.mkdir(exist_ok=True)
        document = openapi.spec()
        described = {"openapi.json": json.dumps(document, indent=2) + "\n", "docs.html": openapi.html(document)}
        for name, text in (HEALTH_ANSWERS | oip_answers(self.settings.model) | described).items():
            (answers / name).write_text(text)
        os.chmod(self.workdir, 0o700)  # nginx's workers run as this user (render): nobody else reads it
        self.draining = False
        config_path = self.workdir / "nginx.conf"
        config_path.write_text(self.config)
        self._write_includes()
        # A rollout's routes: none until serving.rollout writes them (a restart ends a rollout).
        (self.workdir / ROLLOUT_CONF).write_text(rollout_conf())
        (self.workdir / ROLLOUT_MIRROR_CONF).write_text(mirror_conf(False))
        command = [binary, "-p", str(self.workdir), "-c", str(config_path), "-e", str(self.workdir / "error.log")]
        self.process = ManagedProcess("nginx", command, self.workdir / "nginx.out")
        self.process.start()

        def accepting() -> bool:
            try:
                with socket.create_connection((LOOPBACK, self.settings.port), timeout=1):
                    return True
            except OSError:
                return False

        try:
            self.process.wait_until(accepting, timeout, "accepting connections")
        except Exception:
            self.stop()
            raise

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop (SIGQUIT: answers in flight are finished), then kill; safe to call twice.
        ``timeout``: seconds before the kill; default the longest a request can take here
        (:meth:`GatewaySettings.longest_request`) plus 5, so that no request still retrying is cut."""
        if self.process is not None:
            if timeout is None:
                timeout = self.settings.longest_request() + 5
            self.process.stop(timeout, sig=signal.SIGQUIT)
            self.process = None

    def requests_in_flight(self) -> int | None:
        """Requests nginx is handling now (read, waiting for TorchServe, or being answered), from
        its ``stub_status`` on the metrics port, without the status request itself; None when
        nginx does not answer."""
        try:
            with socket.create_connection((LOOPBACK, self.settings.metrics_port), timeout=2) as conn:
                conn.sendall(b"GET /stub_status HTTP/1.0\r\nHost: localhost\r\n\r\n")
                answer = b""
                while chunk := conn.recv(4096):
                    answer += chunk
        except OSError:
            return None
        match = re.search(rb"Reading: (\d+) Writing: (\d+)", answer)
        return int(match.group(1)) + int(match.group(2)) - 1 if match else None

    def log_lines(self) -> list[str]:
        """The access log's lines so far."""
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def retried(self, answered: int = 0, timeout: float = 5.0) -> int:
        """Requests that needed more than one attempt so far (from the access log).

        nginx writes a request's log line only after the client has its answer, so a caller that
        has just received ``answered`` answers passes that count to wait (up to ``timeout``
        seconds) until their lines are in the log.
        """
        deadline = time.monotonic() + timeout
        lines = self.log_lines()
        while len(lines) < answered and time.monotonic() < deadline:
            time.sleep(0.05)
            lines = self.log_lines()
        return sum(attempts(line) > 1 for line in lines)

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def attempts(line: str) -> int:
    """Upstream attempts recorded in one access-log line (``upstream=[500, 200]`` is two; nginx
    separates attempts within a location by commas and across an internal redirect by colons)."""
    if "upstream=[" not in line:
        return 0
    statuses = line.split("upstream=[", 1)[1].split("]", 1)[0]
    return sum(1 for part in statuses.replace(":", ",").split(",") if part.strip() not in ("", "-"))


def nginx_workers(gateway: Gateway) -> dict[int, str]:
    """The gateway's nginx worker processes by pid, with their titles (empty when it is not running)."""
    if gateway.process is None or gateway.process.pid is None:
        return {}
    return workers_of(gateway.process.pid)


def workers_of(master: int) -> dict[int, str]:
    """The worker processes of the nginx master ``master``, by pid, with their titles."""
    try:
        children = psutil.Process(master).children()
    except psutil.Error:
        return {}
    workers = {}
    for child in children:
        with contextlib.suppress(psutil.Error):
            title = " ".join(child.cmdline()).strip()
            if "worker process" in title:
                workers[child.pid] = title
    return workers


def wait_reloaded(gateway: Gateway, before: set[int], timeout: float = RELOAD_TIMEOUT) -> bool:
    """Wait until nginx has taken a reload: a worker not in ``before`` (the pids before the reload)
    runs, and every worker of ``before`` has gone or is shutting down (it accepts nothing new).
    Returns False after ``timeout`` seconds (nginx kept its old config, or is not running)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = nginx_workers(gateway)
        new = any(pid not in before and "shutting down" not in title for pid, title in workers.items())
        old = any(pid in before and "shutting down" not in title for pid, title in workers.items())
        if new and not old:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def apply_routes(prefix: Path, routes: str, shadow: bool = False, timeout: float = 120.0) -> bool:
    """Give the running gateway in ``prefix`` new rollout routes (:func:`rollout_conf`; ``shadow``:
    they mirror a share to a relay) from another process (``serving.rollout``): write them, reload
    nginx gracefully, and wait until the workers
    that had the old routes have finished their requests in flight and exited.

    Returns False when nginx did not take the routes within ``timeout`` seconds.

    Raises:
        FileNotFoundError: no gateway runs in ``prefix`` (no pid file).
    """
    master = int((Path(prefix) / "nginx.pid").read_text().split()[0])
    before = set(workers_of(master))
    shadow = '$rollout_shadow {\n    default "";' not in routes  # some share is mirrored
    for name, text in ((ROLLOUT_CONF, routes), (ROLLOUT_MIRROR_CONF, mirror_conf(shadow))):
        path = Path(prefix) / name
        staged = path.with_suffix(".tmp")
        staged.write_text(text)
        staged.replace(path)
    os.kill(master, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = workers_of(master)
        if workers and not set(workers) & before:
            return True
        time.sleep(0.05)
    return False
