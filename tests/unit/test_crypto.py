"""Device secrets at rest: Fernet round trip, key from env or a 0600 key file, rotation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from records.crypto import KEY_ENV, KEY_FILE, InvalidToken, SecretCipher, load_key_file, new_secret


def test_round_trip_and_token_is_not_the_secret(tmp_path: Path) -> None:
    cipher = SecretCipher.load(tmp_path, env={})
    secret = new_secret()
    token = cipher.encrypt(secret)
    assert secret not in token
    assert cipher.decrypt(token) == secret


def test_new_secret_is_fresh_and_long() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    assert all(len(s) == 16 for s in secrets)


def test_key_file_is_created_private_once_and_reused(tmp_path: Path) -> None:
    first = load_key_file(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(tmp_path) == first
    token = SecretCipher.load(tmp_path, env={}).encrypt("s")
    assert SecretCipher.load(tmp_path, env={}).decrypt(token) == "s"
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temp file left behind


def test_env_key_wins_over_the_file(tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    token = SecretCipher.load(tmp_path, env={KEY_ENV: key}).encrypt("s")
    assert not (tmp_path / KEY_FILE).exists()
    assert SecretCipher(key).decrypt(token) == "s"
    with pytest.raises(InvalidToken):
        SecretCipher.load(tmp_path, env={}).decrypt(token)


def test_rotation_decrypts_with_an_old_key() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    token = SecretCipher(old).encrypt("s")
    rotated = SecretCipher(f"{new},{old}")
    assert rotated.decrypt(token) == "s"
    assert SecretCipher(new).decrypt(rotated.encrypt("t")) == "t"


def test_empty_key_file_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_key_file(tmp_path)
