"""A hospital's threshold state on disk, encrypted at rest with AES-256-GCM (``cryptography``).

The state (its OpenFHE key share, the Shamir shares it holds, its channel keys, the pending
partial decryptions) lives in ``hospital_<i>/threshold_state.bin``, so that any process serving
the hospital (a Flower simulation actor, a deployment's per-message ``flwr-clientapp``) picks it
up. The 256-bit key is in ``keyring/hospital_<i>.key`` beside the workspaces, not inside the
hospital's directory (0600, made on first use): a copy of the hospital's directory (a backup, a
shared data volume) reveals nothing without it. It does not protect against someone who can
read the keyring as the hospital's user; a real site keeps that key in its key management.

The associated data binds a file to its hospital index, so a swapped file is refused.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medfed.crypto.errors import KeyMaterialError
from medfed.fl.workspace import hospital_dir, write_private

STATE = "threshold_state.bin"
KEYRING = "keyring"
_MAGIC = b"MFAR1"


def state_path(workspace: str | Path, index: int) -> Path:
    """Where hospital ``index`` keeps its encrypted threshold state."""
    return hospital_dir(Path(workspace), index) / STATE


def key_path(workspace: str | Path, index: int) -> Path:
    """Where hospital ``index``'s at-rest key lives (outside its directory)."""
    return Path(workspace) / KEYRING / f"hospital_{index}.key"


def _key(workspace: str | Path, index: int) -> bytes:
    path = key_path(workspace, index)
    if not path.exists():
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}")
        write_private(tmp, AESGCM.generate_key(bit_length=256))
        try:
            os.link(tmp, path)  # atomic: two processes cannot both make a key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) != 32:
        raise KeyMaterialError(f"{path} is not a 256-bit key")
    return key


def _aad(index: int) -> bytes:
    return _MAGIC + f"hospital_{index}".encode()


def store(workspace: str | Path, index: int, state: bytes) -> tuple[int, int]:
    """Encrypt ``state`` and replace the hospital's state file; returns its :func:`stamp`."""
    nonce = secrets.token_bytes(12)
    sealed = _MAGIC + nonce + AESGCM(_key(workspace, index)).encrypt(nonce, state, _aad(index))
    path = state_path(workspace, index)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}")
    write_private(tmp, sealed)
    tmp.replace(path)
    return _stamp(path.stat())


def load(workspace: str | Path, index: int) -> bytes | None:
    """The hospital's decrypted state (None if it has none yet); refuses a tampered file."""
    path = state_path(workspace, index)
    try:
        sealed = path.read_bytes()
    except FileNotFoundError:
        return None
    if not sealed.startswith(_MAGIC) or len(sealed) < len(_MAGIC) + 12 + 16:
        raise KeyMaterialError(f"{path} is not a medfed threshold state file")
    nonce, body = sealed[len(_MAGIC) : len(_MAGIC) + 12], sealed[len(_MAGIC) + 12 :]
    try:
        return AESGCM(_key(workspace, index)).decrypt(nonce, body, _aad(index))
    except InvalidTag:
        raise KeyMaterialError(
            f"{path} does not decrypt under hospital {index}'s at-rest key: tampered, another "
            "hospital's, or the keyring changed; run the key setup again"
        ) from None


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_ino, st.st_mtime_ns  # every store is a new file (a new inode)


def stamp(workspace: str | Path, index: int) -> tuple[int, int] | None:
    """The state file's identity, or None if there is none: tells a process whether another
    one changed the state since it last read or wrote it."""
    try:
        return _stamp(state_path(workspace, index).stat())
    except FileNotFoundError:
        return None
