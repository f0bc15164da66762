"""meshjobs: run commands on whichever peer of a federated NATS mesh can do them,
and prove who asked and who answered.

The public API is what this module exports (pinned by a test); everything else
may change between releases.
"""

from meshjobs._version import __version__

# Submitting work
from meshjobs.client import Client, Outcome
from meshjobs.discovery import PeerInfo
from meshjobs.durable import Durable

# Errors: one tree, each with the CLI's exit code
from meshjobs.errors import (
    BrokerError,
    ConnectError,
    HandlerError,
    IdentityError,
    InvalidArguments,
    JobTimeout,
    MeshError,
    NoPeerError,
    PolicyFileError,
    Reason,
    Rejected,
    UsageError,
)

# Identity and trust
from meshjobs.identity import Identity
from meshjobs.router import Constraints, Router

# Offering work
from meshjobs.runtime.app import App, JobContext
from meshjobs.runtime.config import WorkerConfig
from meshjobs.runtime.worker import Worker
from meshjobs.submit import SubmitOptions, Submitted, Submitter
from meshjobs.trust.policy import TrustPolicy

__all__ = [
    # submitting
    "Client",
    "Constraints",
    "Durable",
    "Outcome",
    "PeerInfo",
    "Router",
    "SubmitOptions",
    "Submitted",
    "Submitter",
    # offering work
    "App",
    "JobContext",
    "Worker",
    "WorkerConfig",
    # identity and trust
    "Identity",
    "TrustPolicy",
    # errors
    "BrokerError",
    "ConnectError",
    "HandlerError",
    "IdentityError",
    "InvalidArguments",
    "JobTimeout",
    "MeshError",
    "NoPeerError",
    "PolicyFileError",
    "Reason",
    "Rejected",
    "UsageError",
    "__version__",
]
