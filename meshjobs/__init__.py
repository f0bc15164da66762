"""meshjobs: run commands on whichever peer of a federated NATS mesh can do them,
and prove who asked and who answered.

The public API is what this module exports; everything else may change.
"""

from ._version import __version__
from .app import App, JobContext
from .client import Client, Outcome
from .discovery import PeerInfo
from .errors import (
    BrokerError,
    ConnectError,
    HandlerError,
    IdentityError,
    JobTimeout,
    MeshError,
    NoPeerError,
    PolicyFileError,
    Reason,
    Rejected,
    UsageError,
)
from .identity import Identity
from .policy import TrustPolicy
from .worker import Worker, WorkerConfig

__all__ = [
    "App",
    "BrokerError",
    "Client",
    "ConnectError",
    "HandlerError",
    "Identity",
    "IdentityError",
    "JobContext",
    "JobTimeout",
    "MeshError",
    "NoPeerError",
    "Outcome",
    "PeerInfo",
    "PolicyFileError",
    "Reason",
    "Rejected",
    "TrustPolicy",
    "UsageError",
    "Worker",
    "WorkerConfig",
    "__version__",
]
