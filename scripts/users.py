#!/usr/bin/env python
"""Manage the users of the CDPDNet server (the auth folder; see docs/security.md).

    python scripts/users.py --auth-dir apps/cdpdnet/auth list
    python scripts/users.py --auth-dir apps/cdpdnet/auth add alice --role annotator   # prints a new password once
    python scripts/users.py --auth-dir apps/cdpdnet/auth add bob --role admin --password-stdin < pw.txt
    python scripts/users.py --auth-dir apps/cdpdnet/auth passwd alice                 # a new random password
    python scripts/users.py --auth-dir apps/cdpdnet/auth role alice admin
    python scripts/users.py --auth-dir apps/cdpdnet/auth remove alice

Roles: ``annotator`` (view, infer, save labels, next sample) and ``admin`` (also training, scoring,
deleting images and labels, models, logs). Changes take effect at once on a running server, also for
tokens already issued. The server creates the folder on its first start with authentication on, with
a user ``admin`` whose password is in ``<auth dir>/initial-admin-password``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from lib.server.policy import ROLES  # noqa: E402
from lib.server.users import AuthError, UserStore  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--auth-dir", default=os.path.join("apps", "cdpdnet", "auth"),
                    help="the server's auth folder (--conf auth_dir; default apps/cdpdnet/auth)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list users and roles")
    a = sub.add_parser("add", help="add a user (prints a generated password unless --password-stdin)")
    a.add_argument("name")
    a.add_argument("--role", choices=ROLES, required=True)
    a.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p = sub.add_parser("passwd", help="set a new password (generated, or from --password-stdin)")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true")
    r = sub.add_parser("role", help="change a user's role")
    r.add_argument("name")
    r.add_argument("role", choices=ROLES)
    d = sub.add_parser("remove", help="remove a user (their tokens stop working at once)")
    d.add_argument("name")
    args = ap.parse_args(argv)

    store = UserStore(args.auth_dir)
    try:
        if args.cmd == "list":
            for u in store.list():
                print(f"{u.name}\t{u.role}")
            return 0
        if args.cmd in ("add", "passwd"):
            existing = store.get(args.name)
            if args.cmd == "add" and existing is not None:
                raise AuthError(f"user {args.name!r} exists; use 'passwd' or 'role'")
            if args.cmd == "passwd" and existing is None:
                raise AuthError(f"no user {args.name!r}")
            role = args.role if args.cmd == "add" else existing.role
            import secrets

            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else secrets.token_urlsafe(15)
            store.set_user(args.name, role, password)
            if not args.password_stdin:
                print(f"{args.name} ({role}) password: {password}")
            else:
                print(f"{args.name} ({role}) saved")
            return 0
        if args.cmd == "role":
            if store.get(args.name) is None:
                raise AuthError(f"no user {args.name!r}")
            admins = [u for u in store.list() if u.role == "admin" and u.name != args.name]
            if args.role != "admin" and not admins:
                raise AuthError(f"{args.name!r} is the last admin; add another admin first")
            store.set_user(args.name, args.role)
            print(f"{args.name} is now {args.role}")
            return 0
        if args.cmd == "remove":
            store.remove(args.name)
            print(f"removed {args.name}")
            return 0
    except AuthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
