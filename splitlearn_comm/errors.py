"""Errors raised by splitlearn-comm, compatible with the grpcio ones."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import grpc

Metadata = Tuple[Tuple[str, Any], ...]

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode for a numeric gRPC status code (UNKNOWN if not a code)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


class RpcError(grpc.RpcError, grpc.Call):
    """A failed call, raised by GRPCComputeClient.

    It is a ``grpc.RpcError`` (and a ``grpc.Call``), so code written for grpcio
    works unchanged::

        try:
            client.compute(x)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                ...

    ``str(e)`` says what failed, where (server address and method) and after how
    many attempts.
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, target: str = "",
                 method: str = "", attempts: int = 1, trailing_metadata: Metadata = (),
                 initial_metadata: Metadata = (), debug_error_string: str = "") -> None:
        super().__init__(code, details)
        self._code = code
        self._details = details
        self.target = target
        self.method = method
        self.attempts = attempts
        self._trailing = tuple(trailing_metadata)
        self._initial = tuple(initial_metadata)
        self._debug = debug_error_string

    # grpc.Call / grpc.RpcContext accessors
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    # grpcio's stubs narrow metadata values and time_remaining() to str/float;
    # grpcio itself gives bytes values for -bin keys and None for no deadline.
    def trailing_metadata(self) -> Metadata:  # type: ignore[override]
        return self._trailing

    def initial_metadata(self) -> Metadata:
        return self._initial

    def debug_error_string(self) -> str:
        return self._debug

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> Optional[float]:  # type: ignore[override]
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False

    def __str__(self) -> str:
        where = f" calling {self.method}" if self.method else ""
        if self.target:
            where += f" on {self.target}"
        tries = f" after {self.attempts} attempt{'s' if self.attempts != 1 else ''}"
        return f"{self._code.name}{where}{tries}: {self._details}"

    def __repr__(self) -> str:
        return f"RpcError({self._code!s}, {self._details!r})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # picklable, e.g. across multiprocessing
        return (_rebuild, (self._code.value[0], self._details, self.target, self.method,
                           self.attempts, self._trailing, self._initial, self._debug))


def _rebuild(code: int, details: str, target: str, method: str, attempts: int,
             trailing: Sequence[Any], initial: Sequence[Any], debug: str) -> RpcError:
    return RpcError(status_code(code), details, target=target, method=method, attempts=attempts,
                    trailing_metadata=tuple(trailing), initial_metadata=tuple(initial),
                    debug_error_string=debug)


def from_call_error(exc: BaseException, *, target: str, method: str) -> RpcError:
    """Convert the C core's CallError(code, details, trailing, initial, debug, attempts)."""
    code, details, trailing, initial, debug, attempts = exc.args
    return RpcError(status_code(code), details, target=target, method=method, attempts=attempts,
                    trailing_metadata=trailing, initial_metadata=initial,
                    debug_error_string=debug)


class Abort(Exception):
    """Raised inside the server to end a call with a given status (internal).

    The C core reads ``sl_code`` and ``sl_details`` off the exception.
    """

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Sequence[Any] = ()) -> None:
        super().__init__(details)
        self.sl_code = code.value[0]
        self.sl_details = details
        self.sl_trailing = tuple(trailing)
