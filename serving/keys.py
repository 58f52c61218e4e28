"""Gateway keys: the bearer keys clients send to the gateway.

They live in a JSON file (``{"keys": [{"key": ..., "created": ..., "expires": ...}]}``) that an
operator owns: on a machine it is created with one key at the first start, in Kubernetes it is
mounted from a Secret. Several keys are valid at once, which is what makes rotation free of
downtime: :func:`rotate` adds a new key and gives the old ones a grace period in which clients
switch; the gateway drops a key when it expires. TorchServe's own keys never leave the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# A key guessed by trying is a key given away: at least 32 characters of the URL-safe base64
# alphabet (192 bits, what new_key makes), ASCII only (nginx matches it in a regular expression).
MIN_KEY_LENGTH = 32
KEY_PATTERN = re.compile(rf"[A-Za-z0-9_-]{{{MIN_KEY_LENGTH},}}")


@dataclass(frozen=True)
class GatewayKey:
    """One key; ``expires`` is a Unix time, or None for no expiry."""

    key: str
    created: float
    expires: float | None = None

    def valid(self, now: float) -> bool:
        return self.expires is None or now < self.expires


def new_key() -> str:
    """A random URL-safe key (192 bits)."""
    return secrets.token_urlsafe(24)


def load(path: Path) -> list[GatewayKey]:
    """The keys in ``path``.

    Raises:
        ValueError: The file is not a keys file (the message names it).
    """
    try:
        data = json.loads(Path(path).read_text())
        keys = [GatewayKey(**entry) for entry in data["keys"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a gateway keys file ({err})") from None
    for entry in keys:
        if not isinstance(entry.key, str) or not KEY_PATTERN.fullmatch(entry.key):
            raise ValueError(
                f"{path}: a key must be at least {MIN_KEY_LENGTH} characters of A-Z, a-z, 0-9, - and _ "
                "(python -m serving rotate-key makes one)"
            )
    return keys


def save(path: Path, keys: list[GatewayKey]) -> None:
    """Write ``keys`` atomically, readable by the owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-")
    with os.fdopen(fd, "w") as out:
        json.dump({"keys": [asdict(k) for k in keys]}, out, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure(path: Path) -> list[GatewayKey]:
    """The keys in ``path``, creating the file with one new key if it does not exist."""
    if not Path(path).exists():
        save(path, [GatewayKey(new_key(), time.time())])
    return load(path)


def valid_keys(path: Path, now: float | None = None) -> list[str]:
    """The keys of ``path`` that have not expired, newest first."""
    now = time.time() if now is None else now
    return [k.key for k in sorted(load(path), key=lambda k: k.created, reverse=True) if k.valid(now)]


class KeyWatcher:
    """The valid keys of one keys file, read again only when there is something new to read.

    That is when the file changed (its modification time, size or inode: an atomic replace, as
    :func:`save` does, and Kubernetes' swap of a mounted Secret both change them), when one of
    its keys has expired since the last read, or after :meth:`refresh` (``python -m serving run``
    calls it on SIGHUP). Between those, :meth:`valid` costs one ``stat``.

    Args:
        path: The keys file.
        clock: Unix seconds (tests pass their own).
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self.reads = 0  # how often the file was read and parsed
        self._stamp: tuple[int, int, int] | None = None
        self._keys: list[GatewayKey] = []
        self._next_expiry = float("inf")

    def refresh(self) -> None:
        """Read the file at the next :meth:`valid`, changed or not."""
        self._stamp = None

    def valid(self) -> list[str]:
        """The keys valid now, newest first.

        Raises:
            OSError: The file cannot be read.
            ValueError: It is not a keys file. The last good keys are kept for the next call.
        """
        now = self.clock()
        info = os.stat(self.path)
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp != self._stamp or now >= self._next_expiry:
            keys = load(self.path)
            self.reads += 1
            self._keys, self._stamp = keys, stamp
            self._next_expiry = min(
                (k.expires for k in keys if k.expires is not None and k.expires > now), default=float("inf")
            )
        return [k.key for k in sorted(self._keys, key=lambda k: k.created, reverse=True) if k.valid(now)]


def rotate(path: Path, grace_s: float) -> str:
    """Add a new key; keys without an earlier expiry stay valid for ``grace_s`` more seconds.

    Expired keys are removed from the file. Returns the new key.
    """
    now = time.time()
    kept = [
        GatewayKey(k.key, k.created, now + grace_s if k.expires is None else min(k.expires, now + grace_s))
        for k in ensure(path)
        if k.valid(now)
    ]
    key = new_key()
    save(path, [GatewayKey(key, now), *kept])
    return key
