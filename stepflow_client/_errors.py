"""Failed calls as the domain's typed exceptions: one decoding, shared by every client."""

from __future__ import annotations

import grpc

from stepflow_common.errors import StepflowError
from stepflow_common.rpc_errors import from_rpc_error

__all__ = ["StepflowError", "decode"]


def decode(exc: grpc.RpcError) -> StepflowError:
    """The typed error ``exc`` carries (by the reason in its trailing metadata, else by its
    status code); the caller raises it ``from exc`` so the gRPC error stays visible."""
    return from_rpc_error(exc)
