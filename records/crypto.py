"""Device secrets at rest: Fernet encryption, reversible because DTLS-PSK needs the key itself."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

KEY_ENV = "VIGIL_SECRET_KEY"
KEY_FILE = "secret.key"


def new_secret() -> str:
    """A fresh device secret: 16 URL-safe characters (96 bits).

    Sixteen bytes is the longest pre-shared key tinydtls (the DTLS stack of most constrained CoAP devices,
    and of aiocoap's client) accepts by default; longer keys overflow its buffer.
    """
    return secrets.token_urlsafe(12)


class SecretCipher:
    """Encrypts with the first key and decrypts with any: rotate keys with `VIGIL_SECRET_KEY=new,old`."""

    def __init__(self, keys: str | bytes) -> None:
        text = keys.decode() if isinstance(keys, bytes) else keys
        parts = [k.strip() for k in text.split(",") if k.strip()]
        if not parts:
            raise ValueError("no secret key given")
        self._fernet = MultiFernet([Fernet(k) for k in parts])

    @classmethod
    def load(cls, data_dir: Path, env: Mapping[str, str] | None = None) -> SecretCipher:
        """The key from `VIGIL_SECRET_KEY`, else from `<data_dir>/secret.key` (created 0600 on first use)."""
        environ = os.environ if env is None else env
        key = environ.get(KEY_ENV, "").strip()
        return cls(key if key else load_key_file(data_dir))

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> SecretCipher:
        """`load` with this process's environment."""
        return cls.load(data_dir)

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def decrypt(self, token: str) -> str:
        """The secret; raises `InvalidToken` if the token was not made with one of our keys."""
        return self._fernet.decrypt(token.encode()).decode()


def load_key_file(data_dir: Path) -> str:
    """The key stored in `<data_dir>/secret.key`, generated on first use, race-free across processes."""
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        # Written in full to a private temp file, then linked into place: a second process starting at the
        # same moment either wins the link or reads the winner's complete key, never a half-written one.
        tmp = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path} is empty: restore the key, or every stored device secret is lost")
    return key


__all__ = ["InvalidToken", "SecretCipher", "load_key_file", "new_secret"]
