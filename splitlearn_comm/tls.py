"""TLS settings for servers and clients (the gRPC C core's SSL credentials)."""
from __future__ import annotations

import os
from typing import Any, Optional, Union

PEM = Union[bytes, str, "os.PathLike[str]"]


def _pem(value: Optional[PEM], what: str) -> Optional[str]:
    """PEM text from bytes, a PEM string, or a path to a PEM file."""
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value.decode("ascii")
    elif isinstance(value, str) and "-----BEGIN" in value:
        text = value
    else:
        path = os.fspath(value)
        try:
            with open(path, "r", encoding="ascii") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read the {what} from {path!r}: {e}") from None
    if "-----BEGIN" not in text:
        raise ValueError(f"the {what} is not PEM (no '-----BEGIN' line)")
    return text


class ServerTLS:
    """TLS for a :class:`GRPCComputeServer`.

    Args:
        cert_chain: the server's certificate chain (PEM bytes, PEM text or a file path).
        private_key: its private key (same forms).
        root_certs: CAs whose client certificates are accepted (mutual TLS).
        require_client_auth: refuse clients without a certificate signed by ``root_certs``.
    """

    def __init__(self, cert_chain: PEM, private_key: PEM, root_certs: Optional[PEM] = None,
                 require_client_auth: bool = False) -> None:
        self.cert_chain = _pem(cert_chain, "certificate chain")
        self.private_key = _pem(private_key, "private key")
        self.root_certs = _pem(root_certs, "root certificates")
        self.require_client_auth = bool(require_client_auth)
        if self.require_client_auth and self.root_certs is None:
            raise ValueError("require_client_auth=True needs root_certs to verify clients with")

    def _args(self) -> tuple[Any, ...]:
        return (self.cert_chain, self.private_key, self.root_certs, self.require_client_auth)


class ClientTLS:
    """TLS for a :class:`GRPCComputeClient`.

    Args:
        root_certs: CAs to trust (PEM bytes, PEM text or a file path); ``None`` uses
            the system's.
        cert_chain: a client certificate, for servers that require one (mutual TLS).
        private_key: its private key.
    """

    def __init__(self, root_certs: Optional[PEM] = None, cert_chain: Optional[PEM] = None,
                 private_key: Optional[PEM] = None) -> None:
        self.root_certs = _pem(root_certs, "root certificates")
        self.cert_chain = _pem(cert_chain, "certificate chain")
        self.private_key = _pem(private_key, "private key")
        if (self.cert_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key, and the other way round")

    def _args(self) -> tuple[Any, ...]:
        return (self.root_certs, self.cert_chain, self.private_key)
