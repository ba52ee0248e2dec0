"""Message objects of the wire contract, for the low-level stub
(``GRPCComputeClient.stub``), tools and tests.

These are plain Python objects with the fields of ``proto/splitlearn_comm.proto``
that matter to a caller; the bytes on the wire are written and read by the C core.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence


@dataclass
class ComputeRequest:
    """A Compute call's request: tensor bytes (C order, little-endian) and shape.

    ``dtype`` and ``codec`` default to what an old peer means by their absence:
    float32, raw.
    """

    data: bytes = b""
    shape: Sequence[int] = ()
    dtype: str = "float32"
    codec: str = "raw"
    codec_metadata: Dict[str, Any] = field(default_factory=dict)
    request_id: Optional[int] = None


@dataclass
class ComputeResponse:
    """A Compute call's response."""

    data: bytes
    shape: List[int]
    dtype: str
    codec: str
    codec_metadata: Dict[str, Any]
    compute_time_ms: Optional[float] = None
    request_id: Optional[int] = None


@dataclass
class HealthRequest:
    """HealthCheck's (empty) request."""


@dataclass
class HealthResponse:
    status: str
    message: str
    version: str
    uptime_seconds: Optional[float] = None


@dataclass
class ServiceInfoRequest:
    """GetServiceInfo's (empty) request."""


@dataclass
class ServiceInfoResponse:
    service_name: str
    version: str
    device: str
    uptime_seconds: Optional[float]
    total_requests: int
    custom_info: Dict[str, str]
