"""Workflows over the signed protocol: approval gates (:mod:`meshjobs.workflow.approval`)."""

from meshjobs.workflow.approval import Approval

__all__ = ["Approval"]
