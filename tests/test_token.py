"""Bearer tokens: the seed's file format, every way validate() says no, and the ijrtoken CLI."""
import hashlib
import hmac
import json
import os
import pathlib
import secrets
import stat
import subprocess
import sys

import pytest

import ijr.__main__
from ijr import token
from ijr.token import TokenError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECRET = b"s3cret"
NOW = 1_700_000_000


@pytest.fixture
def tokens(tmp_path):
    return str(tmp_path / "tokens")


def issue(directory, user="alice", ttl=None):
    data = token.generate(user, SECRET, ttl=ttl, now=NOW)
    token.save(data, directory)
    return data


def token_file(directory, data):
    return pathlib.Path(directory, data.accessToken + ".json")


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_round_trip(tokens):
    data = issue(tokens)
    assert token.validate(data.accessToken, SECRET, tokens, now=NOW) == data
    assert data.userId == "alice" and data.timestamp == NOW and data.expires is None


def test_file_has_the_seed_fields_and_only_its_owner_reads_it(tokens):
    data = issue(tokens)
    path = token_file(tokens, data)
    assert mode(path) == 0o600 and mode(tokens) == 0o700
    fields = json.loads(path.read_text())
    assert fields == {
        "userId": "alice", "timestamp": NOW, "randNumber": data.randNumber, "accessToken": data.accessToken,
    }
    assert 0 <= data.randNumber < 2**63


def test_ttl_adds_expires(tokens):
    data = issue(tokens, ttl=60)
    assert json.loads(token_file(tokens, data).read_text())["expires"] == NOW + 60


def test_hmac_matches_an_independent_recomputation(tokens):
    plain, lived = issue(tokens), issue(tokens, ttl=60)
    for data, message in (
        (plain, f"alice:{NOW}:{plain.randNumber}"),
        (lived, f"alice:{NOW}:{lived.randNumber}:{NOW + 60}"),
    ):
        assert data.accessToken == hmac.new(SECRET, message.encode(), hashlib.sha256).hexdigest()


def test_two_tokens_for_one_user_differ(tokens):
    assert issue(tokens).accessToken != issue(tokens).accessToken


@pytest.mark.parametrize("user", ["a.b_c@d-e", "x" * 64, "7"])
def test_good_user_ids(user):
    assert token.generate(user, SECRET).userId == user


@pytest.mark.parametrize("user", ["", "a:b", "x" * 65, "é", "a b", "../x", "alice\n"])
def test_bad_user_ids(user):
    with pytest.raises(TokenError, match="bad user id"):
        token.generate(user, SECRET)


def test_empty_secret_refused():
    with pytest.raises(TokenError, match="empty"):
        token.generate("alice", b"")


@pytest.mark.parametrize("bad", ["", "A" * 64, "../../etc/passwd", "x" * 64, "a" * 63, "a" * 65, "a" * 64 + "\n"])
def test_malformed_tokens_refused_before_any_path_is_built(tmp_path, bad):
    # The directory does not exist: "malformed", not "unknown", shows no file was looked for.
    with pytest.raises(TokenError, match="malformed token"):
        token.validate(bad, SECRET, str(tmp_path / "absent"))


def test_unknown_token(tokens):
    issue(tokens)
    with pytest.raises(TokenError, match="unknown or revoked token"):
        token.validate(secrets.token_hex(32), SECRET, tokens)


def test_edited_file_is_a_forgery(tokens):
    data = issue(tokens)
    path = token_file(tokens, data)
    fields = json.loads(path.read_text())
    path.write_text(json.dumps(fields | {"userId": "root"}))
    with pytest.raises(TokenError, match="token signature mismatch"):
        token.validate(data.accessToken, SECRET, tokens, now=NOW)


def test_extended_expiry_is_a_forgery(tokens):
    data = issue(tokens, ttl=60)
    path = token_file(tokens, data)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"expires": NOW + 10**6}))
    with pytest.raises(TokenError, match="token signature mismatch"):
        token.validate(data.accessToken, SECRET, tokens, now=NOW + 100)


def test_valid_file_under_another_name_is_a_forgery(tokens):
    data = issue(tokens)
    other = secrets.token_hex(32)
    token_file(tokens, data).rename(pathlib.Path(tokens, other + ".json"))
    with pytest.raises(TokenError, match="token signature mismatch"):
        token.validate(other, SECRET, tokens, now=NOW)


def test_wrong_secret(tokens):
    data = issue(tokens)
    with pytest.raises(TokenError, match="token signature mismatch"):
        token.validate(data.accessToken, b"other", tokens, now=NOW)


def test_symlink_to_a_valid_token_elsewhere_is_refused(tmp_path, tokens):
    data = issue(str(tmp_path / "elsewhere"))
    os.makedirs(tokens)
    token_file(tokens, data).symlink_to(token_file(tmp_path / "elsewhere", data))
    with pytest.raises(TokenError, match="symlink"):
        token.validate(data.accessToken, SECRET, tokens, now=NOW)


def test_fifo_is_refused_without_blocking(tokens):
    os.makedirs(tokens)
    name = secrets.token_hex(32)
    os.mkfifo(pathlib.Path(tokens, name + ".json"))
    with pytest.raises(TokenError, match="not a regular file"):
        token.validate(name, SECRET, tokens)


def test_oversized_file_is_refused(tokens):
    data = issue(tokens)
    path = token_file(tokens, data)
    path.write_text(path.read_text() + " " * token.MAX_FILE)
    with pytest.raises(TokenError, match="over"):
        token.validate(data.accessToken, SECRET, tokens, now=NOW)


@pytest.mark.parametrize("edit", [
    lambda f: "not json",
    lambda f: "[" * 3000,
    lambda f: json.dumps([f]),
    lambda f: json.dumps(f | {"timestamp": str(f["timestamp"])}),
    lambda f: json.dumps(f | {"randNumber": True}),
    lambda f: json.dumps({k: v for k, v in f.items() if k != "accessToken"}),
    lambda f: json.dumps(f | {"expires": "never"}),
    lambda f: json.dumps(f | {"accessToken": "é" * 64}),
    lambda f: json.dumps(f | {"userId": "a:b"}),
    lambda f: b"\xff\xfe",
])
def test_malformed_file_contents(tokens, edit):
    data = issue(tokens)
    path = token_file(tokens, data)
    content = edit(json.loads(path.read_text()))
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TokenError, match="token file"):
        token.validate(data.accessToken, SECRET, tokens, now=NOW)


def test_expiry(tokens):
    data = issue(tokens, ttl=60)
    assert token.validate(data.accessToken, SECRET, tokens, now=NOW + 59) == data
    with pytest.raises(TokenError, match="token expired"):
        token.validate(data.accessToken, SECRET, tokens, now=NOW + 60)


def test_revoke_takes_effect_at_once(tokens):
    data = issue(tokens)
    token.validate(data.accessToken, SECRET, tokens, now=NOW)
    token.revoke(data.accessToken, tokens)
    with pytest.raises(TokenError, match="unknown or revoked token"):
        token.validate(data.accessToken, SECRET, tokens, now=NOW)
    with pytest.raises(TokenError, match="unknown or revoked token"):
        token.revoke(data.accessToken, tokens)
    with pytest.raises(TokenError, match="malformed token"):
        token.revoke("../" + data.accessToken, tokens)


def test_save_never_overwrites(tokens):
    data = issue(tokens)
    with pytest.raises(FileExistsError):
        token.save(data, tokens)


def test_read_secret_needs_exactly_one_flag(tmp_path):
    for secret, secret_file in ((None, None), ("s", str(tmp_path / "f"))):
        with pytest.raises(TokenError, match="--secret and --secret-file"):
            token.read_secret(secret, secret_file)
    with pytest.raises(TokenError, match="--token-secret and --token-secret-file"):
        token.read_secret(None, None, flag_prefix="--token-")


def test_read_secret_sources(tmp_path):
    secret_file = tmp_path / "secret"
    assert token.read_secret("abc", None) == b"abc"
    secret_file.write_bytes(b"abc\n")
    assert token.read_secret(None, str(secret_file)) == b"abc"
    secret_file.write_bytes(b"abc\n\n")  # only one newline is dropped
    assert token.read_secret(None, str(secret_file)) == b"abc\n"


@pytest.mark.parametrize("content", [b"", b"\n"])
def test_read_secret_refuses_empty_files(tmp_path, content):
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(content)
    with pytest.raises(TokenError, match=f"--secret-file {secret_file}: the secret is empty"):
        token.read_secret(None, str(secret_file))


def test_read_secret_errors_name_flag_and_file(tmp_path):
    with pytest.raises(TokenError, match="--secret: the secret is empty"):
        token.read_secret("", None)
    with pytest.raises(TokenError, match=f"--secret-file {tmp_path}/absent: No such file"):
        token.read_secret(None, str(tmp_path / "absent"))


@pytest.mark.parametrize("text, seconds", [
    ("3600", 3600), ("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), (" 2H ", 7200),
])
def test_parse_ttl(text, seconds):
    assert token.parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0h", "-5", "1.5h", "5x", "h", "1 h", "99999d", "٣"])
def test_parse_ttl_refuses(text):
    with pytest.raises(TokenError, match="bad duration"):
        token.parse_ttl(text)


def run_ijr(*args):
    return subprocess.run([sys.executable, "-m", "ijr", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_cli_subprocess_issues_and_revokes(tmp_path, tokens):
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret\n")
    issued = run_ijr("token", "bob", "--secret-file", str(secret_file), "--path", tokens, "--ttl", "1h")
    assert (issued.returncode, issued.stderr) == (0, "")
    printed = issued.stdout.strip()
    assert issued.stdout == printed + "\n"
    data = token.validate(printed, SECRET, tokens)
    assert data.userId == "bob" and data.expires == data.timestamp + 3600
    revoked = run_ijr("token", "revoke", printed, "--path", tokens)
    assert (revoked.returncode, revoked.stdout) == (0, "")
    assert not os.path.exists(token_file(tokens, data))


def test_cli_subprocess_usage_error_is_one_line():
    result = run_ijr("token", "bob", "--secret", "s")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["ijrtoken: the following arguments are required: --path"]


def ijrtoken(capsys, *args):
    """ijrtoken in-process, reached as the multi-call binary is: by its argv[0]."""
    code = ijr.__main__.main(["/x/ijrtoken", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_argv0_prints_only_the_token(capsys, tokens):
    code, out, err = ijrtoken(capsys, "carol", "--secret", "s3cret", "--path", tokens)
    assert (code, err) == (0, "")
    assert token.validate(out.strip(), SECRET, tokens).userId == "carol"


@pytest.mark.parametrize("args, names", [
    (["carol", "--secret", "s"], "--path"),
    (["carol", "--path", "d"], "--secret"),
    (["carol", "--secret", "s", "--secret-file", "f", "--path", "d"], "--secret-file"),
    (["carol", "--secret", "s", "--path", "d", "--ttl", "soon"], "--ttl"),
    (["--secret", "s", "--path", "d", "revoke"], "'revoke' is a subcommand"),
    (["revoke", "--path", "d"], "TOKEN"),
])
def test_cli_usage_errors_are_one_line_exit_2(capsys, args, names):
    code, out, err = ijrtoken(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("ijrtoken: ") and names in err


def test_cli_runtime_errors_are_one_line_exit_1(capsys, tmp_path, tokens):
    for args, reason in (
        (["a:b", "--secret", "s", "--path", tokens], "bad user id"),
        (["dave", "--secret-file", str(tmp_path / "absent"), "--path", tokens], "No such file"),
        (["revoke", "a" * 64, "--path", tokens], "unknown or revoked token"),
        (["revoke", "../../etc/passwd", "--path", tokens], "malformed token"),
    ):
        code, out, err = ijrtoken(capsys, *args)
        assert (code, out) == (1, "")
        assert len(err.splitlines()) == 1 and err.startswith("ijrtoken: ") and reason in err


def test_cli_revoke_in_process(capsys, tokens):
    data = issue(tokens)
    assert ijrtoken(capsys, "revoke", data.accessToken, "--path", tokens) == (0, "", "")
    with pytest.raises(TokenError, match="unknown or revoked"):
        token.validate(data.accessToken, SECRET, tokens)


def test_cli_version_and_help(capsys):
    assert ijrtoken(capsys, "--version") == (0, f"ijrtoken {ijr.__version__}\n", "")
    for help_flag in ("--help", "help"):
        code, out, err = ijrtoken(capsys, help_flag)
        assert (code, err) == (0, "")
        assert "--secret-file" in out and "ijrtoken revoke TOKEN --path DIR" in out


def test_importing_token_pulls_in_neither_grpc_nor_cryptography():
    code = "import ijr.token, sys; print('grpc' in sys.modules, 'cryptography' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == ["False", "False"], result.stderr
