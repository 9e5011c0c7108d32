"""One executable, several personalities: dispatch on argv[0] or on the first argument.

Each personality is imported only when chosen, so `ijrtoken` never pays for grpc and
`ijrctl` never pays for cryptography.
"""
import importlib
import os
import sys

from ijr import __version__

# personality -> (module, one-line description)
PERSONALITIES = {
    "daemon": ("ijr.daemon", "the job daemon (ijrd): serves JobService over mutual TLS"),
    "ctl": ("ijr.ctl", "the client (ijrctl): start, stop, list, status and output of jobs"),
    "token": ("ijr.token", "issue and revoke bearer tokens (ijrtoken)"),
    "init": ("ijr.init", "create a CA, certificates, a secret, a first token and a client config"),
}
ARGV0 = {"ijrd": "daemon", "ijrctl": "ctl", "ijrtoken": "token"}

USAGE = "usage: ijr {" + ",".join(PERSONALITIES) + "} [args...]\n\n" + "\n".join(
    f"  {name:<8} {desc}" for name, (_, desc) in PERSONALITIES.items()
) + "\n\nAlso callable through symlinks named ijrd, ijrctl and ijrtoken.\n"


def run(name: str, argv: list[str]) -> int:
    module = importlib.import_module(PERSONALITIES[name][0])
    return module.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    invoked = os.path.basename(argv[0])
    if invoked in ARGV0:
        return run(ARGV0[invoked], argv[1:])
    args = argv[1:]
    if not args:
        sys.stderr.write(USAGE)
        return 2
    if args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if args[0] == "--version":
        print(f"ijr {__version__}")
        return 0
    if args[0] not in PERSONALITIES:
        sys.stderr.write(f"ijr: unknown personality {args[0]!r}\n{USAGE}")
        return 2
    return run(args[0], args[1:])


if __name__ == "__main__":
    sys.exit(main())
