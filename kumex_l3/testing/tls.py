"""A throwaway CA and a certificate for 127.0.0.1 and localhost, for the sandbox over TLS.

``files = make_tls(directory)`` writes ``ca.pem`` (give it to clients:
``KUMEX_CA_FILE``, ``SSL_CERT_FILE``, httpx's ``verify``), ``cert.pem`` (the
chain) and ``key.pem`` (``SANDBOX_TLS_CERT`` / ``SANDBOX_TLS_KEY``). The CA
exists only in those files: nothing is installed in the system's trust store,
and no client anywhere has verification turned off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["TlsFiles", "make_tls"]


@dataclass(frozen=True)
class TlsFiles:
    """Where :func:`make_tls` wrote the CA, the certificate chain and its key (PEM)."""

    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path | str) -> TlsFiles:
    """A new CA and a server certificate for ``127.0.0.1``/``localhost`` in ``directory``."""
    import trustme  # a test dependency: only the code that asks for TLS needs it

    where = Path(directory)
    where.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="kumex-l3 throwaway test CA")
    leaf = ca.issue_cert("127.0.0.1", "localhost", "::1")
    files = TlsFiles(where / "ca.pem", where / "cert.pem", where / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    leaf.private_key_pem.write_to_path(str(files.key))
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    files.key.chmod(0o600)
    return files
