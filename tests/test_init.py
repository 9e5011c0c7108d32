"""ijr init: a CA and certificates that verify, private files, a working token and config."""
import datetime
import ipaddress
import json
import os
import shlex
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import ijr.__main__
from ijr import init, token

SERVER, USER = "ijr.example.com", "alice"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One set-up shared by the read-only tests: (directory, ijrd command line, config path)."""
    base = tmp_path_factory.mktemp("init")
    directory, config = base / "etc-ijr", base / "ijrctl-config"
    command = init.create(str(directory), SERVER, USER, str(config))
    return directory, command, config


def cert(directory, name):
    return x509.load_pem_x509_certificate((directory / name).read_bytes())


def key(directory, name):
    return serialization.load_pem_private_key((directory / name).read_bytes(), password=None)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_ca_is_a_self_signed_ca(setup):
    directory, _, _ = setup
    ca = cert(directory, "ca.pem")
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > datetime.timedelta(days=3649)


def test_server_and_client_certificates_are_issued_by_the_ca(setup):
    directory, _, _ = setup
    ca = cert(directory, "ca.pem")
    purposes = {"server.pem": ExtendedKeyUsageOID.SERVER_AUTH, "client.pem": ExtendedKeyUsageOID.CLIENT_AUTH}
    for name, purpose in purposes.items():
        leaf = cert(directory, name)
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [purpose]
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc > datetime.timedelta(days=729)
        assert leaf.not_valid_after_utc <= ca.not_valid_after_utc


def test_server_names(setup):
    directory, _, _ = setup
    sans = cert(directory, "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [SERVER, "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_client_certificate_names_the_user(setup):
    directory, _, _ = setup
    subject = cert(directory, "client.pem").subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == USER


def test_keys_are_p256_and_match_their_certificates(setup):
    directory, _, _ = setup
    for name in ("ca", "server", "client"):
        private = key(directory, f"{name}.key")
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"
        assert cert(directory, f"{name}.pem").public_key() == private.public_key()
        assert (directory / f"{name}.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8


def test_secrets_are_private(setup):
    directory, _, config = setup
    assert mode(directory) == 0o700 and mode(directory / "tokens") == 0o700
    for name in ("ca.key", "server.key", "client.key", "secret"):
        assert mode(directory / name) == 0o600, name
    assert mode(config) == 0o600
    for path in (directory / "tokens").iterdir():
        assert mode(path) == 0o600


def test_secret_is_32_random_bytes_in_hex_on_one_line(setup):
    directory, _, _ = setup
    text = (directory / "secret").read_text()
    assert text.endswith("\n") and len(text) == 65 and bytes.fromhex(text[:-1])


def test_config_points_at_everything_and_its_token_validates(setup):
    directory, _, config = setup
    fields = json.loads(config.read_text())
    assert fields == {
        "address": "127.0.0.1", "port": 50051, "server_name": SERVER,
        "ca": str(directory / "ca.pem"), "cert": str(directory / "client.pem"), "key": str(directory / "client.key"),
        "token": fields["token"],
    }
    secret = token.read_secret(None, str(directory / "secret"))
    data = token.validate(fields["token"], secret, str(directory / "tokens"))
    assert data.userId == USER and data.expires is None


def test_ijrd_command_line_mentions_every_file(setup):
    directory, command, config = setup
    words = shlex.split(command)
    assert words[0] == "ijrd"
    flags = dict(zip(words[1::2], words[2::2]))
    assert flags == {
        "--server": SERVER, "--port": "50051", "--cert": str(directory / "server.pem"),
        "--key": str(directory / "server.key"), "--ca": str(directory / "ca.pem"),
        "--secret-file": str(directory / "secret"), "--tokens": str(directory / "tokens"), "--admin": USER,
        "--mask": str(config),  # it holds an admin token: hidden from jobs
    }


def test_openssl_verifies_the_chain(setup):
    directory, _, _ = setup
    result = subprocess.run(
        ["/usr/bin/openssl", "verify", "-CAfile", "ca.pem", "server.pem", "client.pem"],
        cwd=directory, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["server.pem: OK", "client.pem: OK"]


def test_refuses_to_overwrite_without_force(tmp_path):
    directory, config = tmp_path / "ijr", tmp_path / "config"
    init.create(str(directory), SERVER, USER, str(config))
    before = {path: path.read_bytes() for path in [*directory.iterdir(), config] if path.is_file()}
    with pytest.raises(init.InitError, match=f"{directory}/ca.pem already exists: pass --force"):
        init.create(str(directory), SERVER, USER, str(config))
    assert {path: path.read_bytes() for path in before} == before

    init.create(str(directory), SERVER, USER, str(config), force=True)
    assert all(path.read_bytes() != content for path, content in before.items())
    new_token = json.loads(config.read_text())["token"]
    token.validate(new_token, token.read_secret(None, str(directory / "secret")), str(directory / "tokens"))


def test_refuses_an_existing_config_alone(tmp_path):
    config = tmp_path / "config"
    config.write_text("{}")
    with pytest.raises(init.InitError, match=f"{config} already exists"):
        init.create(str(tmp_path / "ijr"), SERVER, USER, str(config))
    assert not (tmp_path / "ijr").exists()


def test_ip_address_as_server_name(tmp_path):
    init.create(str(tmp_path / "ijr"), "10.1.2.3", USER, str(tmp_path / "config"))
    sans = cert(tmp_path / "ijr", "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(ip) for ip in ("10.1.2.3", "127.0.0.1")]


@pytest.mark.parametrize("server, user, error", [
    ("bad name", USER, "bad server name"),
    ("-x.example", USER, "bad server name"),
    (SERVER, "a:b", "bad user id"),
])
def test_bad_names_are_refused_before_anything_is_written(tmp_path, server, user, error):
    with pytest.raises((init.InitError, token.TokenError), match=error):
        init.create(str(tmp_path / "ijr"), server, user, str(tmp_path / "config"))
    assert list(tmp_path.iterdir()) == []


def ijr_init(capsys, *args):
    code = ijr.__main__.main(["ijr", "init", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli(capsys, tmp_path):
    args = ["--dir", str(tmp_path / "ijr"), "--config", str(tmp_path / "config"), "--user", "bob"]
    code, out, err = ijr_init(capsys, *args)
    assert code == 0
    assert out.splitlines()[0].startswith("ijrd --server localhost --port 50051 ")
    assert f" --admin bob --mask {tmp_path / 'config'}" in out.splitlines()[0]
    assert err.startswith("ijr init: wrote ")
    sans = cert(tmp_path / "ijr", "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]  # the default NAME, not twice

    code, out, err = ijr_init(capsys, *args)
    assert (code, out) == (1, "")
    assert err == f"ijr init: {tmp_path}/ijr/ca.pem already exists: pass --force to replace it\n"


def test_cli_usage(capsys, tmp_path):
    assert ijr_init(capsys, "--version") == (0, f"ijr init {ijr.__version__}\n", "")
    code, out, err = ijr_init(capsys, "--help")
    assert code == 0 and "--force" in out and err == ""
    code, out, err = ijr_init(capsys, "--bogus")
    assert (code, out) == (2, "") and err == "ijr init: unrecognized arguments: --bogus\n"
    (tmp_path / "file").write_text("")
    code, out, err = ijr_init(capsys, "--dir", str(tmp_path / "file" / "sub"), "--config", str(tmp_path / "config"))
    assert (code, out) == (1, "") and err.startswith(f"ijr init: {tmp_path}/file") and len(err.splitlines()) == 1
