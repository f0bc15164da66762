"""Every stream and bucket of mesh state, as declared by the modules that own them.

``meshjobs mesh up`` hands this list to the infrastructure, which creates it
with the topology's replicas and placement; infrastructure itself never
imports a job module.
"""

from __future__ import annotations

from meshjobs import durable
from meshjobs.runtime import ledger
from meshjobs.state import StateSpec
from meshjobs.trust import quarantine, reputation
from meshjobs.workflow import approval

MESH_STATE: tuple[StateSpec, ...] = (
    *reputation.STATE,
    *quarantine.STATE,
    *durable.STATE,
    *ledger.STATE,
    *approval.STATE,
)
