"""TLS 1.3 only, for both ends, with grpcio that has no minimum-version setting.

grpcio reads GRPC_SSL_CIPHER_SUITES once, when grpc is imported. Naming only a TLS 1.2 PSK
suite that no certificate-based peer can use leaves TLS 1.2 with no shared cipher, while
TLS 1.3 still negotiates BoringSSL's fixed suites (AES-128-GCM, AES-256-GCM, CHACHA20-POLY1305).
The server also checks the negotiated version on every RPC (ijr.service).
"""
import os
import sys

CIPHERS_ENV = "GRPC_SSL_CIPHER_SUITES"
TLS12_UNUSABLE = "ECDHE-PSK-CHACHA20-POLY1305"
TLS_VERSION = "TLSv1.3"


def restrict_to_tls13() -> None:
    """Must run before the first `import grpc` of the process, or it does nothing."""
    if "grpc" in sys.modules:
        raise RuntimeError("restrict_to_tls13() called after grpc was imported: TLS 1.2 would stay enabled")
    os.environ[CIPHERS_ENV] = TLS12_UNUSABLE


def read_pem(path: str, what: str) -> bytes:
    """Read a certificate or key file, naming it in the error."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise OSError(f"cannot read {what} {path}: {err.strerror}") from None


def check_files(cert: str, key: str, ca: str, flags: tuple[str, str, str] = ("--cert", "--key", "--ca")) -> None:
    """Refuse unusable PEM files up front, naming them: grpc would only say it can't bind."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as err:
        raise ValueError(f"{flags[0]} {cert} and {flags[1]} {key} are not a certificate and its key "
                         f"in PEM ({err.reason or err})") from None
    try:
        context.load_verify_locations(ca)
    except ssl.SSLError as err:
        raise ValueError(f"{flags[2]} {ca} is not a PEM certificate ({err.reason or err})") from None
