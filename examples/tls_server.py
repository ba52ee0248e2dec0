"""Serve over mutual TLS: only clients with a certificate from your CA get in.

The script makes a throwaway public-key infrastructure with the ``openssl``
command line, in a temporary directory that is deleted at the end:

* ``ca``: the certificate authority both sides trust;
* ``server``: the server's certificate, signed by ``ca``, valid for 127.0.0.1 and
  localhost;
* ``client``: a client certificate signed by ``ca``;
* ``other-ca`` and ``intruder``: a certificate from a CA nobody trusts.

It then serves on 127.0.0.1 (a free port) with ``require_client_auth=True`` and
connects three clients: one with the ``client`` certificate (served), one without a
certificate and one with the ``intruder`` certificate (both refused during the TLS
handshake: UNAVAILABLE). The gRPC C core also logs each failed handshake on stderr.

Usage::

    python examples/tls_server.py

Needs the ``openssl`` program. In a real deployment the certificates come from
your PKI, and private keys are readable by the service only. See docs/server.md.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from splitlearn_comm import (ClientTLS, ComputeFunction, GRPCComputeClient, GRPCComputeServer,
                             RpcError, ServerTLS)


class Negate(ComputeFunction):
    def compute(self, input_tensor):
        return -input_tensor


def openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    """A self-signed CA certificate and key: NAME.crt, NAME.key (EC P-256, valid 1 day)."""
    openssl(directory, "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.crt")


def make_cert(directory: Path, name: str, ca: str, alt_names: str) -> None:
    """A key and a certificate for NAME signed by CA, valid for ALT_NAMES."""
    openssl(directory, "req", "-new", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
    (directory / f"{name}.ext").write_text(f"subjectAltName={alt_names}\n")
    openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
            f"{ca}.key", "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext",
            "-out", f"{name}.crt")


def try_client(label: str, address: str, tls: ClientTLS) -> bool:
    """True when the call succeeded."""
    with GRPCComputeClient(address, tls=tls, retry_strategy=None, timeout=10) as client:
        try:
            result = client.compute(torch.tensor([1.0, -2.0]))
        except RpcError as e:
            print(f"{label}: refused, {e.code().name}")
            return False
    print(f"{label}: served, result {result.tolist()}")
    return True


def main() -> int:
    if shutil.which("openssl") is None:
        print("error: this example needs the openssl command line tool", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="splitlearn-pki-") as tmp:
        pki = Path(tmp)
        make_ca(pki, "ca")
        make_cert(pki, "server", "ca", "DNS:localhost,IP:127.0.0.1")
        make_cert(pki, "client", "ca", "DNS:client")
        make_ca(pki, "other-ca")
        make_cert(pki, "intruder", "other-ca", "DNS:intruder")
        print(f"made a throwaway CA and certificates in {pki}")

        tls = ServerTLS(cert_chain=pki / "server.crt", private_key=pki / "server.key",
                        root_certs=pki / "ca.crt", require_client_auth=True)
        server = GRPCComputeServer(Negate(), host="127.0.0.1", port=0, tls=tls)
        server.start()
        address = f"127.0.0.1:{server.port}"
        print(f"serving over mutual TLS on {address}")
        try:
            trusted = try_client("trusted client", address,
                                 ClientTLS(root_certs=pki / "ca.crt",
                                           cert_chain=pki / "client.crt",
                                           private_key=pki / "client.key"))
            anonymous = try_client("client without a certificate", address,
                                   ClientTLS(root_certs=pki / "ca.crt"))
            intruder = try_client("client with a certificate from another CA", address,
                                  ClientTLS(root_certs=pki / "ca.crt",
                                            cert_chain=pki / "intruder.crt",
                                            private_key=pki / "intruder.key"))
        finally:
            server.stop(grace=1.0)
    ok = trusted and not anonymous and not intruder
    print("as expected: only the trusted client was served" if ok else "UNEXPECTED results")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
