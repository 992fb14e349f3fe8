"""appliance-keys: create, list, revoke API keys and read their usage.

``create`` prints the new secret alone on stdout, so ``KEY=$(appliance-keys create ...)`` works;
everything meant for a person goes to stderr.
"""

import argparse
import sys
import time
from pathlib import Path

from .keys import KeyExists, KeyStore, StoreUnavailable, UnknownKey
from .settings import load_settings


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance-keys", description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, help="key store file (default: APPLIANCE_KEYS_DB)")
    sub = p.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key and print its secret")
    create.add_argument("--name", required=True)
    create.add_argument("--rpm", type=positive_int, help="requests per minute")
    create.add_argument("--tpm", type=positive_int, help="tokens per minute")
    create.add_argument("--expires-days", type=positive_int)
    sub.add_parser("list", help="list keys (never their secrets)")
    revoke = sub.add_parser("revoke", help="revoke a key; the proxy refuses it within a second")
    revoke.add_argument("name")
    usage = sub.add_parser("usage", help="requests and tokens per key")
    usage.add_argument("name", nargs="?")
    return p


def when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(stamp)) if stamp else "-"


def run(args: argparse.Namespace, store: KeyStore) -> int:
    if args.command == "create":
        secret = store.create(args.name, args.rpm, args.tpm, args.expires_days)
        print(f"created key {args.name!r}; the secret is shown once, on stdout", file=sys.stderr)
        print(secret)
    elif args.command == "list":
        print(f"{'NAME':20} {'ENDS':6} {'RPM':>6} {'TPM':>8} {'CREATED':16} {'EXPIRES':16} STATE")
        now = time.time()
        for key in store.all_keys():
            state = "active" if key.usable(now) else (
                "revoked" if key.revoked_at else "expired")
            print(f"{key.name:20} …{key.hint:5} {key.rpm or '-':>6} {key.tpm or '-':>8} "
                  f"{when(key.created_at):16} {when(key.expires_at):16} {state}")
    elif args.command == "revoke":
        store.revoke(args.name)
        print(f"revoked key {args.name!r}", file=sys.stderr)
    elif args.command == "usage":
        print(f"{'NAME':20} {'REQUESTS':>10} {'PROMPT':>12} {'COMPLETION':>12}")
        for row in store.usage(args.name):
            print(f"{row.name:20} {row.requests:>10} {row.prompt_tokens:>12} "
                  f"{row.completion_tokens:>12}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    path = args.db or load_settings().keys_db
    try:
        store = KeyStore(path, create=args.command == "create")
    except StoreUnavailable as exc:
        print(f"appliance-keys: {exc}", file=sys.stderr)
        return 1
    try:
        return run(args, store)
    except (KeyExists, UnknownKey) as exc:
        print(f"appliance-keys: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
