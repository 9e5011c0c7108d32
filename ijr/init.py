"""`ijr init`: everything a first run needs, in one command.

In DIR it writes a CA, a server and a client certificate signed by that CA (all EC P-256),
the token secret and a first token; next to the user it writes an ijrctl config that
points at all of it; then it prints the ijrd command line that serves with those files.
The CA key stays in DIR to sign more client certificates later, so DIR is 0700 and every
key and the secret are 0600.
"""
import datetime
import ipaddress
import json
import os
import re
import secrets
import shlex
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ijr import __version__, token

PORT = 50051
FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key", "secret")
CA_DAYS, LEAF_DAYS = 3650, 730
SKEW = datetime.timedelta(minutes=5)  # certificates are valid a little before now: clocks differ
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_KEY_USAGES = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
               "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")


class InitError(Exception):
    """A set-up that can't be made; the message names the file or value at fault."""


def create(directory: str, server: str, user: str, config: str, force: bool = False, port: int = PORT) -> str:
    """Write the whole set-up and return the ijrd command line that serves with it.

    Names are checked and existing files refused before the first write, so a refusal
    leaves everything as it was. With force, existing files are replaced; tokens signed
    with the old secret then stop working.
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    config = os.path.abspath(os.path.expanduser(config))
    server_san = _server_san(server)
    secret = secrets.token_hex(32)
    first = token.generate(user, secret.encode())  # the key is the file's text, as read_secret reads it
    path = {name: os.path.join(directory, name) for name in FILES}
    if not force:
        _refuse_existing([*path.values(), config])

    os.makedirs(directory, mode=0o700, exist_ok=True)
    files = _certificates(server_san, user) | {"secret": (secret + "\n").encode()}
    for name, data in files.items():
        _write(path[name], data, 0o644 if name.endswith(".pem") else 0o600, force)
    tokens = os.path.join(directory, "tokens")
    token.save(first, tokens)
    ctl_config = {
        "address": "127.0.0.1", "port": port, "server_name": server,
        "ca": path["ca.pem"], "cert": path["client.pem"], "key": path["client.key"], "token": first.accessToken,
    }
    _write(config, (json.dumps(ctl_config, indent=2) + "\n").encode(), 0o600, force)  # it holds the token
    return shlex.join([
        "ijrd", "--server", server, "--port", str(port), "--cert", path["server.pem"], "--key", path["server.key"],
        "--ca", path["ca.pem"], "--secret-file", path["secret"], "--tokens", tokens, "--admin", user,
        "--mask", config,  # it holds an admin token: jobs must not read it
    ])


def _certificates(server_san: x509.GeneralName, user: str) -> dict[str, bytes]:
    """A fresh CA, and a server and a client certificate it signed: file name -> PEM."""
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _ca_certificate(ca_key)
    loopback = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    sans = list(dict.fromkeys([server_san, *loopback]))  # without duplicates, if NAME is one of them
    server_cert = _leaf_certificate(ca, ca_key, server_key, "ijrd", ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_cert = _leaf_certificate(ca, ca_key, client_key, user, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return {
        "ca.pem": _cert_pem(ca), "ca.key": _key_pem(ca_key),
        "server.pem": _cert_pem(server_cert), "server.key": _key_pem(server_key),
        "client.pem": _cert_pem(client_cert), "client.key": _key_pem(client_key),
    }


def _server_san(server: str) -> x509.GeneralName:
    """The certificate's name for server: clients check it against the name they dial (or override)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(server))
    except ValueError:
        pass
    if len(server) > 253 or not all(_LABEL.fullmatch(label) for label in server.split(".")):
        raise InitError(f"bad server name {server!r}: use a DNS name (letters, digits, '-' and '.') or an IP address")
    return x509.DNSName(server)


def _refuse_existing(paths: list[str]) -> None:
    for path in paths:
        if os.path.lexists(path):
            raise InitError(f"{path} already exists: pass --force to replace it")


def _write(path: str, data: bytes, mode: int, force: bool) -> None:
    """A fresh file, even with force: the old one is removed rather than written through."""
    if force:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    token.write_new(path, data, mode)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*set_bits: str) -> x509.KeyUsage:
    """x509.KeyUsage wants all nine bits spelled out; this names only the ones that are set."""
    return x509.KeyUsage(**{bit: bit in set_bits for bit in _KEY_USAGES})


def _certificate(subject: x509.Name, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, days: int, extensions: list) -> x509.Certificate:
    """A certificate for public_key, signed by issuer_key; extensions are (extension, critical) pairs."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """Self-signed; may sign end certificates only (path length 0)."""
    name = _name("IJR CA")
    return _certificate(name, key.public_key(), name, key, CA_DAYS, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_key_usage("key_cert_sign", "crl_sign"), True),
    ])


def _leaf_certificate(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey,
                      common_name: str, purpose: x509.ObjectIdentifier, sans: list) -> x509.Certificate:
    """An end certificate good for one purpose only: serving, or being a client."""
    extensions = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage("digital_signature"), True),
        (x509.ExtendedKeyUsage([purpose]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ]
    if sans:
        extensions.append((x509.SubjectAlternativeName(sans), False))
    return _certificate(_name(common_name), key.public_key(), ca.subject, ca_key, LEAF_DAYS, extensions)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def main(argv: list[str]) -> int:
    """ijr init: print the ijrd command line on stdout; say what was written on stderr."""
    parser = token.CliParser(
        "ijr init", prog="ijr init",
        description="Create a CA, server and client certificates, a token secret, a first token "
        "and an ijrctl config; print the ijrd command line that uses them.",
    )
    parser.add_argument("--dir", default="/etc/ijr", help="where to put it all (default: %(default)s, needs root)")
    parser.add_argument("--server", default="localhost", metavar="NAME",
                        help="the name clients dial ijrd by, put in its certificate (default: %(default)s)")
    parser.add_argument("--user", default="admin",
                        help="the first user: client certificate and token (default: %(default)s)")
    parser.add_argument("--config", default="~/.ijrctl-config", metavar="PATH",
                        help="the ijrctl config to write (default: %(default)s)")
    parser.add_argument("--port", type=int, default=PORT, help="the port ijrd will listen on (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace existing files (tokens signed with the old secret stop working)")
    parser.add_argument("--version", action="version", version=f"ijr init {__version__}")
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # argparse, after --help, --version or a usage error
        return int(done.code or 0)
    try:
        command = create(args.dir, args.server, args.user, args.config, args.force, args.port)
    except (InitError, token.TokenError) as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"{err.filename or args.dir}: {err.strerror}")
    print(command)
    sys.stderr.write(f"ijr init: wrote {os.path.abspath(args.dir)} and the ijrctl config "
                     f"{os.path.abspath(os.path.expanduser(args.config))}; start ijrd with the line above\n")
    return 0


def _fail(message: str) -> int:
    sys.stderr.write(f"ijr init: {message}\n")
    return 1
