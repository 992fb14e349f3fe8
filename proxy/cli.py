"""appliance-keys: create, update, show, list, revoke API keys and read their usage.

``create`` prints the new secret alone on stdout, so ``KEY=$(appliance-keys create ...)`` works;
everything meant for a person goes to stderr. ``update`` changes only the settings it is given;
``--no-rpm``, ``--no-tpm``, ``--no-expiry``, ``--no-max-concurrent``, ``--all-models`` and
``--no-quota`` remove a limit (a limit of 0 is refused rather than read as "none").
"""

import argparse
import math
import sys
import time

from .keys.backends import open_store
from .keys.store import (
    PERIODS,
    SETTINGS,
    Key,
    KeyExists,
    KeyReport,
    KeyStore,
    StoreUnavailable,
    UnknownKey,
    period_end,
)
from .settings import load_settings

# update's flags that remove a limit: setting -> (flag, help). The flag stores CLEAR (None).
CLEARS = {
    "rpm": ("--no-rpm", "no requests-per-minute limit"),
    "tpm": ("--no-tpm", "no tokens-per-minute limit"),
    "expires_days": ("--no-expiry", "the key never expires"),
    "max_concurrent": ("--no-max-concurrent", "no per-key cap on requests at the engine"),
    "models": ("--all-models", "the key may use every model"),
    "quota_tokens": ("--no-quota", "no token quota"),
    "cache_group": ("--own-cache", "the key's prefix cache is its own (no cache group)"),
}
CLEAR = object()


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a number greater than 0")
    return value


def model_names(text: str) -> frozenset[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give served model names separated by commas, none of them empty")
    return frozenset(names)


def add_settings(p: argparse.ArgumentParser, update: bool) -> None:
    """The settings ``create`` and ``update`` share; on ``update`` each may be cleared."""
    options = [
        ("--rpm", "requests per minute", {"type": positive_int}),
        ("--tpm", "tokens per minute (prompt + completion)", {"type": positive_int}),
        ("--expires-days", "days from now until the key stops working",
         {"type": positive_int}),
        ("--max-concurrent", "requests of this key at the engine at once; more wait their turn",
         {"type": positive_int, "metavar": "N"}),
        ("--weight", "share of engine slots when keys compete (default 1)",
         {"type": positive_number, "metavar": "W"}),
        ("--models", "comma-separated served model names the key may use (default: every model)",
         {"type": model_names, "metavar": "A,B"}),
        ("--quota-tokens", "prompt + completion tokens per quota period",
         {"type": positive_int, "metavar": "N"}),
        ("--quota-period", "the quota's UTC calendar period (default month)",
         {"choices": PERIODS}),
        ("--cache-group", "share the engine's prefix cache with the other keys of this group "
         "(default: the key's cache is its own)", {"metavar": "NAME"}),
    ]
    for flag, text, kwargs in options:
        setting = flag[2:].replace("-", "_")
        target = p.add_mutually_exclusive_group() if update else p
        target.add_argument(flag, dest=setting, help=text, **kwargs)
        if update and setting in CLEARS:
            clear, clear_text = CLEARS[setting]
            target.add_argument(clear, dest=setting, action="store_const", const=CLEAR,
                                help=clear_text)
    if not update:
        p.set_defaults(weight=1.0, quota_period="month")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance-keys", description=__doc__.splitlines()[0])
    p.add_argument("--db", help="key store: a SQLite file or a postgresql:// URL (default: "
                   "APPLIANCE_KEYS_URL, else APPLIANCE_KEYS_DB)")
    sub = p.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key and print its secret")
    create.add_argument("--name", required=True)
    add_settings(create, update=False)
    update = sub.add_parser("update", help="change a key's settings; its usage is kept",
                            epilog="Settings not given stay as they are.")
    update.add_argument("name")
    add_settings(update, update=True)
    show = sub.add_parser("show", help="one key's settings and usage (never its secret)")
    show.add_argument("name")
    sub.add_parser("list", help="list keys and their limits (never their secrets)")
    revoke = sub.add_parser("revoke", help="revoke a key; the proxy refuses it within a second")
    revoke.add_argument("name")
    usage = sub.add_parser("usage", help="requests and tokens per key, the quota period's, "
                           "and of them the tokens batch lines used")
    usage.add_argument("name", nargs="?")
    return p


def settings_given(args: argparse.Namespace) -> dict[str, object]:
    """The settings on the command line, a cleared one as None; absent ones left out."""
    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    return {name: None if value is CLEAR else value for name, value in given.items()}


def when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(stamp)) if stamp else "-"


def state(key: Key, now: float) -> str:
    if key.usable(now):
        return "active"
    return "revoked" if key.revoked_at else "expired"


def limit(value: object) -> str:
    return "-" if value is None else str(value)


def models(key: Key) -> str:
    return "*" if key.models is None else ",".join(sorted(key.models))


def quota(key: Key) -> str:
    return "-" if key.quota_tokens is None else f"{key.quota_tokens}/{key.quota_period}"


def show(report: KeyReport, now: float) -> None:
    key, total = report.key, report.total
    left = "no quota" if report.quota_left is None else f"{report.quota_left} left"
    rows = [
        ("name", key.name),
        ("secret ends", "…" + key.hint),
        ("state", state(key, now)),
        ("created", when(key.created_at) + " UTC"),
        ("expires", when(key.expires_at) + (" UTC" if key.expires_at else "")),
        ("rpm", limit(key.rpm)),
        ("tpm", limit(key.tpm)),
        ("max concurrent", limit(key.max_concurrent)),
        ("weight", f"{key.weight:g}"),
        ("models", "every model" if key.models is None else ", ".join(sorted(key.models))),
        ("cache group", key.cache_group or "- (its own cache)"),
        ("quota", "-" if key.quota_tokens is None
         else f"{key.quota_tokens} tokens per {key.quota_period}"),
        ("period", f"{report.period} (ends {when(period_end(key.quota_period, now))} UTC)"),
        ("period used", f"{report.period_tokens} tokens, {left}"),
        ("requests", total.requests),
        ("prompt tokens", total.prompt_tokens),
        ("completion tokens", total.completion_tokens),
    ]
    for label, value in rows:
        print(f"{label + ':':19} {value}")


def run(args: argparse.Namespace, store: KeyStore) -> int:
    now = time.time()
    if args.command == "create":
        secret = store.create(args.name, **settings_given(args))
        print(f"created key {args.name!r}; the secret is shown once, on stdout", file=sys.stderr)
        print(secret)
    elif args.command == "update":
        changes = settings_given(args)
        store.update(args.name, **changes)
        print(f"updated key {args.name!r}: {', '.join(sorted(changes))}", file=sys.stderr)
    elif args.command == "show":
        show(store.report(args.name, now), now)
    elif args.command == "list":
        print(f"{'NAME':20} {'ENDS':6} {'RPM':>6} {'TPM':>8} {'CONC':>5} {'WEIGHT':>6} "
              f"{'QUOTA':>16} {'MODELS':16} {'CREATED':16} {'EXPIRES':16} STATE")
        for key in store.all_keys():
            print(f"{key.name:20} …{key.hint:5} {limit(key.rpm):>6} {limit(key.tpm):>8} "
                  f"{limit(key.max_concurrent):>5} {key.weight:>6g} {quota(key):>16} "
                  f"{models(key):16} {when(key.created_at):16} {when(key.expires_at):16} "
                  f"{state(key, now)}")
    elif args.command == "revoke":
        store.revoke(args.name)
        print(f"revoked key {args.name!r}", file=sys.stderr)
    elif args.command == "usage":
        # BATCH: of the tokens before it, those batch lines used (proxy/batch/).
        batch = store.jobs().batch_tokens()
        print(f"{'NAME':20} {'REQUESTS':>10} {'PROMPT':>12} {'COMPLETION':>12} {'PERIOD':10} "
              f"{'QUOTA':>12} {'USED':>12} {'LEFT':>12} {'BATCH':>12}")
        for report in store.reports(args.name, now):
            total = report.total
            print(f"{total.name:20} {total.requests:>10} {total.prompt_tokens:>12} "
                  f"{total.completion_tokens:>12} {report.period:10} "
                  f"{limit(report.key.quota_tokens):>12} {report.period_tokens:>12} "
                  f"{limit(report.quota_left):>12} {batch.get(total.name, 0):>12}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "update" and not settings_given(args):
        p.error("update: give at least one setting to change")
    location = args.db or load_settings().keys_location
    try:
        store = open_store(location, create=args.command == "create", pool_size=1)
    except StoreUnavailable as exc:
        print(f"appliance-keys: {exc}", file=sys.stderr)
        return 1
    try:
        return run(args, store)
    except (KeyExists, UnknownKey, ValueError) as exc:
        print(f"appliance-keys: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
