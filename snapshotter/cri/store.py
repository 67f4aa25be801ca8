"""Pull credentials seen on CRI PullImage calls, kept per image, encrypted at rest.

The store is a `CredentialSource` for the registry client. It holds secrets only in
`Credential` objects (redacted repr) and in one Fernet-encrypted file; nothing here logs
a secret or puts one in an exception message.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from snapshotter.errors import PermissionDenied
from snapshotter.registry.credentials import Credential

__all__ = ["CredentialStore", "StoredImage", "UnsafeKeyFile"]

log = logging.getLogger(__name__)

KEY_FILE = "credentials.key"
DATA_FILE = "credentials.enc"
_FORMAT = 1


class UnsafeKeyFile(PermissionDenied):
    """The key file belongs to another user, or is not a regular file."""


@dataclass(frozen=True, slots=True)
class StoredImage:
    """What `entries()` shows of one stored credential: never the secret itself."""

    image: str
    host: str
    username: str
    kind: str  # "password" or "identity-token"
    expires_at: float | None  # seconds since the epoch; None: kept until the image is removed


@dataclass(slots=True)
class _Entry:
    host: str
    credential: Credential
    stored_at: float
    expires_at: float


class CredentialStore:
    """Credentials by image reference, looked up by registry host; expiring; persistent.

    Lifecycle: `CredentialStore(directory, ttl)` loads what a previous daemon stored
    (creating the directory 0700 and a fresh key file 0600 on first use); the CRI
    proxy calls `remember()` before it forwards a PullImage and `revert()` if the pull
    fails; `forget()` on RemoveImage. The registry client calls `lookup(host)`, which
    answers with the most recently stored, unexpired credential for that host. Every
    change is written through (temp file, fsync, rename), so a restarted daemon can
    still read the layers of images pulled before it. An entry expires `ttl` seconds
    after the pull that stored it (wall clock, since it must survive restarts); `ttl`
    0 keeps entries until the image is removed. Example::

        store = CredentialStore(root / "cri", ttl=86400)
        previous = store.remember("reg.example/app:v1", "reg.example", Credential("u", "p"))
        await store.lookup("reg.example")  # Credential(username='u', password=<redacted>)

    A data file that cannot be decrypted (lost key, corruption) is logged without its
    content and replaced on the next change: kubelet's next pull supplies them again.
    """

    def __init__(
        self, directory: Path, ttl: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._dir = directory
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self._fernet = Fernet(self._load_key())
        self._load()

    # -- CredentialSource ---------------------------------------------------------------
    async def lookup(self, host: str) -> Credential | None:
        return self.credential_for(host)

    def credential_for(self, host: str) -> Credential | None:
        now = self._clock()
        with self._lock:
            live = [e for e in self._entries.values()
                    if e.host == host and not self._expired(e, now)]
        if not live:
            return None
        return max(live, key=lambda e: e.stored_at).credential

    # -- changes, from the proxy's gRPC threads -----------------------------------------
    def remember(self, image: str, host: str, credential: Credential) -> _Entry | None:
        """Store `credential` for `image`; returns the entry it replaced (for `revert`)."""
        now = self._clock()
        expires = now + self._ttl if self._ttl > 0 else float("inf")
        with self._lock:
            previous = self._entries.get(image)
            self._entries[image] = _Entry(host, credential, now, expires)
            self._save_locked()
        log.info("pull credentials for %s stored (registry %s, user %r)",
                 image, host, credential.username or "<token>")
        return previous

    def revert(self, image: str, previous: _Entry | None) -> None:
        """Undo a `remember` whose pull failed: wrong credentials must not stay in use."""
        with self._lock:
            if previous is None:
                self._entries.pop(image, None)
            else:
                self._entries[image] = previous
            self._save_locked()

    def forget(self, image: str) -> bool:
        with self._lock:
            gone = self._entries.pop(image, None) is not None
            if gone:
                self._save_locked()
        if gone:
            log.info("pull credentials for %s removed with the image", image)
        return gone

    def entries(self) -> list[StoredImage]:
        now = self._clock()
        with self._lock:
            items = [(k, e) for k, e in self._entries.items() if not self._expired(e, now)]
        return [
            StoredImage(image, e.host, e.credential.username,
                        "identity-token" if e.credential.identity_token else "password",
                        None if e.expires_at == float("inf") else e.expires_at)
            for image, e in sorted(items)
        ]

    # -- persistence --------------------------------------------------------------------
    def _expired(self, entry: _Entry, now: float) -> bool:
        return entry.expires_at <= now

    def _load_key(self) -> bytes:
        path = self._dir / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._read_key(path)
        key = Fernet.generate_key()
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        # A key without the data it encrypted is harmless; data without its key is lost.
        (self._dir / DATA_FILE).unlink(missing_ok=True)
        return key

    def _read_key(self, path: Path) -> bytes:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise UnsafeKeyFile(f"credential key {path}: not a regular file owned by this user")
        if st.st_mode & 0o077:
            log.warning("credential key %s was readable by others (mode %o); now 0600",
                        path, stat.S_IMODE(st.st_mode))
            os.chmod(path, 0o600)
        return path.read_bytes().strip()

    def _load(self) -> None:
        path = self._dir / DATA_FILE
        try:
            token = path.read_bytes()
        except FileNotFoundError:
            return
        try:
            doc = json.loads(self._fernet.decrypt(token))
            if doc.get("format") != _FORMAT:
                raise ValueError("unknown format")
            now = self._clock()
            for image, raw in doc["images"].items():
                entry = _Entry(
                    host=str(raw["host"]),
                    credential=Credential(str(raw.get("username", "")),
                                          str(raw.get("password", "")),
                                          str(raw.get("identity_token", ""))),
                    stored_at=float(raw["stored_at"]),
                    expires_at=float(raw["expires_at"]),
                )
                if not self._expired(entry, now):
                    self._entries[str(image)] = entry
        except (InvalidToken, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Only the error's type: the plaintext may hold secrets.
            log.warning("credential store %s unreadable (%s); starting empty",
                        path, type(exc).__name__)
            self._entries.clear()
            return
        log.info("credential store: %d image(s) with pull credentials restored",
                 len(self._entries))

    def _save_locked(self) -> None:
        now = self._clock()
        images = {
            image: {
                "host": e.host,
                "username": e.credential.username,
                "password": e.credential.password,
                "identity_token": e.credential.identity_token,
                "stored_at": e.stored_at,
                "expires_at": e.expires_at if e.expires_at != float("inf") else 1e300,
            }
            for image, e in self._entries.items()
            if not self._expired(e, now)
        }
        token = self._fernet.encrypt(json.dumps({"format": _FORMAT, "images": images}).encode())
        path = self._dir / DATA_FILE
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
