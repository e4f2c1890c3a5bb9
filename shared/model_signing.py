"""Signed global models: the coordinator signs each model it sends (sites verify first) and
each round's checkpoint (a resumed run verifies it before continuing).

The signature covers the SHA-256 of every parameter (name, dtype, shape, bytes, in order),
the run id, the round and the plan hash, so a model cannot be altered, replayed into another
round or run, or paired with another plan without the site noticing.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared import signing


def model_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name, value in arrays.items():
        v = np.ascontiguousarray(value)
        h.update(f"{name}|{v.dtype.str}|{v.shape}|".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def _message(arrays: dict[str, np.ndarray], *, run_id: str, server_round: int, plan_hash: str) -> bytes:
    return f"fedrelapse-model|{model_digest(arrays)}|{run_id}|{server_round}|{plan_hash}".encode()


def sign_model(key: Ed25519PrivateKey, arrays: dict[str, np.ndarray], *, run_id: str, server_round: int, plan_hash: str) -> str:
    return signing.sign(key, _message(arrays, run_id=run_id, server_round=server_round, plan_hash=plan_hash))


def verify_model(key: Ed25519PublicKey, arrays: dict[str, np.ndarray], signature: str, *, run_id: str, server_round: int, plan_hash: str) -> bool:
    return signing.verify(key, _message(arrays, run_id=run_id, server_round=server_round, plan_hash=plan_hash), signature)


def _checkpoint_message(digest: str, *, run_id: str, server_round: int, plan_hash: str, records_digest: str | None) -> bytes:
    # A different prefix from _message: a checkpoint's signature can never pass as the
    # signature of a model sent to sites, nor the other way round. With ``records_digest``
    # (server.run_folder.records_digest: the rounds in metrics.json up to this one) the
    # signature binds the run's record too; without it, the form of checkpoints written
    # before records were bound (each form's signature fails as the other's).
    if records_digest is None:
        return f"fedrelapse-checkpoint|{digest}|{run_id}|{server_round}|{plan_hash}".encode()
    return f"fedrelapse-checkpoint-v2|{digest}|{run_id}|{server_round}|{plan_hash}|{records_digest}".encode()


def sign_checkpoint(
    key: Ed25519PrivateKey, arrays: dict[str, np.ndarray], *, run_id: str, server_round: int, plan_hash: str, records_digest: str | None = None,
) -> str:
    """Signature over the global model after ``server_round`` (and the digest of the run's
    round records so far, when given), kept in the checkpoint file."""
    return signing.sign(key, _checkpoint_message(model_digest(arrays), run_id=run_id, server_round=server_round, plan_hash=plan_hash, records_digest=records_digest))


def verify_checkpoint(
    key: Ed25519PublicKey, arrays: dict[str, np.ndarray], signature: str, *, run_id: str, server_round: int, plan_hash: str, records_digest: str | None = None,
) -> bool:
    return signing.verify(key, _checkpoint_message(model_digest(arrays), run_id=run_id, server_round=server_round, plan_hash=plan_hash, records_digest=records_digest), signature)
