"""One exception type per domain, each carrying the CLI exit code it maps to.

The CLI catches :class:`FedrelapseError` and prints its message without a traceback, so
every message must be a full sentence that names the file, row or field and says what to do.
"""

from __future__ import annotations


class FedrelapseError(Exception):
    """Base class of every error a user can cause and fix."""

    exit_code: int = 1


class ConfigError(FedrelapseError):
    """A YAML or command-line setting is missing, mistyped or out of range."""

    exit_code = 2


class DataError(FedrelapseError):
    """A site's manifest or recordings cannot be used."""

    exit_code = 3


class PolicyError(FedrelapseError):
    """A privacy policy forbids what was asked (budget spent, σ too small, ...)."""

    exit_code = 4


class UnreachableEpsilonError(PolicyError):
    """The plan's ε cannot be reached with any amount of noise (it is below what the
    accountant can certify at the plan's δ). A site that meets it refuses with code ``budget``."""

    refusal_code = "budget"


class CryptoError(FedrelapseError):
    """A key, certificate or signature is missing or does not verify."""

    exit_code = 5


class FederationError(FedrelapseError):
    """A federated run could not start or finish (no sites, all refused, ...)."""

    exit_code = 6
