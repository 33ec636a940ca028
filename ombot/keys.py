"""Ed25519 identities for the bot and each master, stored as 0600 files.

One key pair per party: the Ed25519 key signs, and its Curve25519 conversion (libsodium's
crypto_sign_ed25519_*_to_curve25519) encrypts, so a party publishes a single public key.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from ombot.tables import read_secret_file
from ombot.errors import OmbotError


class KeyFileError(OmbotError):
    """A key file or public key that cannot be used."""


def encode_public(key: VerifyKey) -> str:
    return base64.b64encode(bytes(key)).decode()


def decode_public(text: str) -> VerifyKey:
    return VerifyKey(_key_bytes(text, f"public key {text[:16]!r}..."))


def _key_bytes(text: str, what: str) -> bytes:
    """32 bytes from base64, or a KeyFileError saying what was wrong with `what`."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{what}: not base64 (keys are written by `ombot keygen`)") from None
    if len(raw) != 32:
        raise KeyFileError(f"{what}: a key is 32 bytes, this one is {len(raw)}")
    return raw


@dataclass(frozen=True)
class Identity:
    """A party's private key, with the derived keys the envelope needs."""

    signing_key: SigningKey

    @cached_property
    def verify_key(self) -> VerifyKey:
        return self.signing_key.verify_key

    @cached_property
    def verify_key_bytes(self) -> bytes:
        return bytes(self.verify_key)

    @cached_property
    def box_key(self) -> PrivateKey:
        return self.signing_key.to_curve25519_private_key()

    @property
    def public(self) -> str:
        return encode_public(self.verify_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def load(cls, path: Path) -> Identity:
        return cls(SigningKey(_key_bytes(read_secret_file(path), str(path))))

    def save(self, path: Path) -> None:
        """Write the private key (0600, never overwriting) and NAME.pub beside it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        seed = base64.b64encode(bytes(self.signing_key)).decode() + "\n"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileError(f"{path} exists; refusing to overwrite a key") from None
        with os.fdopen(fd, "w") as f:
            f.write(seed)
        path.with_suffix(".pub").write_text(self.public + "\n")


def box_public(key: VerifyKey) -> PublicKey:
    return key.to_curve25519_public_key()
