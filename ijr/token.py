"""Bearer tokens: issue, check and revoke them (the ijrtoken personality).

A token is 64 hex characters, the HMAC-SHA256, keyed with the server's secret, of
"userId:timestamp:randNumber" (":expires" appended when it has a lifetime). It is also
the name of its file, DIR/<token>.json, which holds those fields (the seed's format).
The daemon accepts a token only if that file exists (deleting it revokes the token at
once) and the HMAC recomputed from the file matches both the file and the token
presented, so neither a guessed name nor an edited file gets in.

Only the standard library here: ijrtoken must start fast, without grpc or cryptography.
"""
import argparse
import dataclasses
import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import time
from typing import NoReturn

from ijr import __version__

USER_ID = re.compile(r"[A-Za-z0-9._@-]{1,64}")  # no ':', the separator of the signed fields
TOKEN = re.compile(r"[0-9a-f]{64}")
MAX_FILE = 4096  # a real token file is about 200 bytes; a secret is much smaller still
MAX_TTL = 3650 * 86400  # longer than ten years is surely a typo
_TTL = re.compile(r"([0-9]+)([smhd]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SUBCOMMANDS = ("revoke", "help")  # matched as the first argument, so never user ids

USAGE = """ijrtoken USER (--secret S | --secret-file FILE) --path DIR [--ttl T]
       ijrtoken revoke TOKEN --path DIR"""


class TokenError(Exception):
    """A token, secret, user id or lifetime that can't be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class TokenData:
    """The fields of a token file, named as in the file."""

    userId: str
    timestamp: int
    randNumber: int
    accessToken: str
    expires: int | None = None


def generate(user_id: str, secret: bytes, ttl: int | None = None, now: float | None = None) -> TokenData:
    """A new token for user_id, valid for ttl seconds (for ever if None); not yet saved."""
    if not USER_ID.fullmatch(user_id):
        raise TokenError(f"bad user id {user_id!r}: use 1 to 64 of A-Z a-z 0-9 . _ @ -")
    if ttl is not None and not 0 < ttl <= MAX_TTL:
        raise TokenError(f"bad ttl {ttl}: must be between 1 and {MAX_TTL} seconds")
    timestamp = int(time.time() if now is None else now)
    expires = None if ttl is None else timestamp + ttl
    rand = secrets.randbelow(2**63)
    return TokenData(user_id, timestamp, rand, _sign(secret, user_id, timestamp, rand, expires), expires)


def _sign(secret: bytes, user_id: str, timestamp: int, rand: int, expires: int | None) -> str:
    if not secret:
        raise TokenError("the secret is empty")  # an empty key would let anyone sign
    message = f"{user_id}:{timestamp}:{rand}" + ("" if expires is None else f":{expires}")
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def save(token: TokenData, directory: str) -> str:
    """Write token to directory/<token>.json, readable by its owner only; returns the path."""
    if not TOKEN.fullmatch(token.accessToken):
        raise TokenError("malformed token")  # it becomes a file name: keep it inside directory
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fields = dataclasses.asdict(token)
    if token.expires is None:
        del fields["expires"]  # the seed's files have no such field
    path = os.path.join(directory, token.accessToken + ".json")
    write_new(path, (json.dumps(fields, indent=2) + "\n").encode())
    return path


def write_new(path: str, data: bytes, mode: int = 0o600) -> None:
    """Create path with mode and write data: never over an existing file, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with open(fd, "wb") as f:
        f.write(data)


def validate(token: str, secret: bytes, directory: str, now: float | None = None) -> TokenData:
    """The token's data if it is well formed, on file, signed with secret and unexpired.

    Every failure is a TokenError, except ijrd itself running out of descriptors or memory
    (OSError: the token may be fine). The token must be hex before it becomes part of a path,
    so no token can name a file outside directory. Nothing is cached: a token whose file
    was deleted fails on its next use.
    """
    if not isinstance(token, str) or not TOKEN.fullmatch(token):
        raise TokenError("malformed token")
    data = _parse(_read_token_file(os.path.join(directory, token + ".json")))
    expected = _sign(secret, data.userId, data.timestamp, data.randNumber, data.expires)
    # Both, and both compared in full: the file must be unedited and be the one named by token.
    signed_file = hmac.compare_digest(expected, data.accessToken)
    signed_token = hmac.compare_digest(expected, token)
    if not (signed_file and signed_token):
        raise TokenError("token signature mismatch")
    if data.expires is not None and data.expires <= (time.time() if now is None else now):
        raise TokenError("token expired")
    return data


def _read_token_file(path: str) -> bytes:
    """The file's bytes; refuses symlinks, anything but a regular file (a FIFO would block) and big files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TokenError("unknown or revoked token") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TokenError("token file is a symlink") from None
        if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise
        raise TokenError(f"cannot open token file: {err.strerror}") from None
    try:
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TokenError("token file is not a regular file")
            raw = f.read(MAX_FILE + 1)
    except OSError as err:
        raise TokenError(f"cannot read token file: {err.strerror}") from None
    if len(raw) > MAX_FILE:
        raise TokenError(f"token file is over {MAX_FILE} bytes")
    return raw


def _parse(raw: bytes) -> TokenData:
    """Token file contents -> TokenData, insisting on the right field types (bool is not an int)."""
    try:
        fields = json.loads(raw)
    except (ValueError, RecursionError):
        raise TokenError("token file is not valid JSON") from None
    if not isinstance(fields, dict):
        raise TokenError("token file is not a JSON object")
    for name, kind in (("userId", str), ("timestamp", int), ("randNumber", int), ("accessToken", str)):
        if type(fields.get(name)) is not kind:
            raise TokenError(f"token file: {name} is missing or not a {kind.__name__}")
    expires = fields.get("expires")
    if expires is not None and type(expires) is not int:
        raise TokenError("token file: expires is not an int")
    if not USER_ID.fullmatch(fields["userId"]) or not TOKEN.fullmatch(fields["accessToken"]):
        raise TokenError("token file: malformed userId or accessToken")
    return TokenData(fields["userId"], fields["timestamp"], fields["randNumber"], fields["accessToken"], expires)


def revoke(token: str, directory: str) -> None:
    """Delete the token's file; the daemon reads it on every call, so this takes effect at once."""
    if not TOKEN.fullmatch(token):
        raise TokenError("malformed token")
    try:
        os.unlink(os.path.join(directory, token + ".json"))
    except FileNotFoundError:
        raise TokenError("unknown or revoked token") from None
    except OSError as err:
        raise TokenError(f"cannot delete token file: {err.strerror}") from None


def read_secret(secret: str | None, secret_file: str | None, flag_prefix: str = "--") -> bytes:
    """The HMAC key, from exactly one of the two flags (named with flag_prefix in errors).

    The file form keeps the secret out of `ps`. One trailing newline is dropped, so
    `echo s > FILE` gives the same key as `--secret s`.
    """
    flag, file_flag = f"{flag_prefix}secret", f"{flag_prefix}secret-file"
    if (secret is None) == (secret_file is None):
        raise TokenError(f"give exactly one of {flag} and {file_flag}")
    if secret is not None:
        key, where = secret.encode(), flag
    else:
        where = f"{file_flag} {secret_file}"
        try:
            with open(secret_file, "rb") as f:
                key = f.read(MAX_FILE + 1)
        except OSError as err:
            raise TokenError(f"{where}: {err.strerror}") from None
        if len(key) > MAX_FILE:
            raise TokenError(f"{where}: over {MAX_FILE} bytes, not a secret")
        key = key.removesuffix(b"\n")
    if not key:
        raise TokenError(f"{where}: the secret is empty")
    return key


def parse_ttl(text: str) -> int:
    """'3600', '90s', '30m', '12h', '7d' -> seconds."""
    match = _TTL.fullmatch(text.strip().lower())
    if not match:
        raise TokenError(f"bad duration {text!r}: use a number with an optional unit s, m, h or d (e.g. 12h)")
    seconds = int(match.group(1)) * _TTL_UNITS[match.group(2)]
    if not 0 < seconds <= MAX_TTL:
        raise TokenError(f"bad duration {text!r}: must be between 1s and {MAX_TTL // 86400}d")
    return seconds


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `<name>: <message>`, exit 2: no usage dump."""

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__(allow_abbrev=False, **kwargs)
        self.name = name

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.name}: {message}\n")


def main(argv: list[str]) -> int:
    """ijrtoken: issue a token (print it) or revoke one. Subcommands are matched first."""
    try:
        if argv[:1] == ["revoke"]:
            return _revoke_cli(argv[1:])
        return _issue_cli(["--help"] if argv[:1] == ["help"] else argv)
    except SystemExit as done:  # argparse, after --help, --version or a usage error
        return int(done.code or 0)


def _issue_cli(argv: list[str]) -> int:
    parser = CliParser(
        "ijrtoken", prog="ijrtoken", usage=USAGE,
        description="Issue a bearer token for USER: save it as DIR/<token>.json and print it. "
        "`ijrtoken revoke TOKEN --path DIR` deletes it, which revokes it at once.",
    )
    parser.add_argument("user", metavar="USER", help="the user id the token stands for (1-64 of A-Z a-z 0-9 . _ @ -)")
    secret = parser.add_mutually_exclusive_group(required=True)
    secret.add_argument("--secret", metavar="S", help="the HMAC secret ijrd checks tokens with (shows in ps)")
    secret.add_argument("--secret-file", metavar="FILE", help="a file holding the secret, e.g. the one ijr init wrote")
    parser.add_argument("--path", required=True, metavar="DIR", help="the token directory (ijrd --tokens)")
    parser.add_argument("--ttl", metavar="T", help="lifetime: seconds, or a number with s, m, h or d (default: none)")
    parser.add_argument("--version", action="version", version=f"ijrtoken {__version__}")
    args = parser.parse_args(argv)
    if args.user in _SUBCOMMANDS:
        parser.error(f"{args.user!r} is a subcommand, not a user id: put it first")
    try:
        ttl = None if args.ttl is None else parse_ttl(args.ttl)
    except TokenError as err:
        parser.error(f"--ttl: {err}")
    try:
        token = generate(args.user, read_secret(args.secret, args.secret_file), ttl)
        save(token, args.path)
    except TokenError as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"{err.filename or args.path}: {err.strerror}")
    print(token.accessToken)
    return 0


def _revoke_cli(argv: list[str]) -> int:
    parser = CliParser("ijrtoken", prog="ijrtoken revoke", description="Revoke TOKEN: delete its file, at once.")
    parser.add_argument("token", metavar="TOKEN", help="the token, as ijrtoken printed it")
    parser.add_argument("--path", required=True, metavar="DIR", help="the token directory (ijrd --tokens)")
    args = parser.parse_args(argv)
    try:
        revoke(args.token, args.path)
    except TokenError as err:
        return _fail(f"revoke {args.token!r}: {err}")
    return 0


def _fail(message: str) -> int:
    sys.stderr.write(f"ijrtoken: {message}\n")
    return 1
