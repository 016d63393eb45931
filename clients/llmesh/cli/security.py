"""Operator subcommands for tokens and the audit log: ``tokens create|list|revoke``, ``audit``.

They talk to etcd directly (``--etcd`` / ``LLMESH_ETCD``, ``--namespace``), not to the control
plane: whoever can write etcd already controls the mesh, so etcd access is what makes an
operator, and the first admin token needs no token to create. Secrets are printed once, at
creation, and stored only as SHA-256 hashes. ``--file PATH`` keeps the records in a JSON file
instead, for servers started with ``--token-file PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from llmesh._table import format_table
from llmesh.common.audit import AuditEntry, read_audit
from llmesh.common.auth import ROLE_USER, ROLES, new_token
from llmesh.common.auth_store import EtcdTokens, read_token_file, update_token_file
from llmesh.common.errors import NotFound
from llmesh.common.etcd import EtcdKV
from llmesh.common.etcd_keys import DEFAULT_NAMESPACE, Keys
from llmesh.common.etcd_security import EtcdSecurity, add_etcd_arguments
from llmesh.i18n import t

T = TypeVar("T")


def _with_etcd(args: argparse.Namespace, work: Callable[[EtcdKV, Keys], Awaitable[T]]) -> T:
    async def run() -> T:
        kv = EtcdKV(args.etcd, security=EtcdSecurity.from_args(args))
        try:
            return await work(kv, Keys(args.namespace))
        finally:
            await kv.close()

    return asyncio.run(run())


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cmd_create(args: argparse.Namespace) -> int:
    token, record = new_token(args.name, args.role, args.model or ())

    async def work(kv: EtcdKV, keys: Keys) -> None:
        await EtcdTokens(kv, keys).add(record)

    if args.file:
        update_token_file(args.file, lambda records: [*records, record])
    else:
        _with_etcd(args, work)
    if args.quiet:
        print(token)
        return 0
    scope = ", ".join(record.models) or t("every model", "所有模型")
    print(t("token (shown once; keep it secret):", "令牌（只显示这一次，请妥善保管）："))
    print(token)
    print(
        t(
            f"id {record.id}, name {record.name!r}, role {record.role}, models: {scope}",
            f"id {record.id}，名称 {record.name!r}，角色 {record.role}，模型：{scope}",
        )
    )
    print(t("use it: export LLMESH_TOKEN=<token>", "使用：export LLMESH_TOKEN=<令牌>"))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    async def work(kv: EtcdKV, keys: Keys) -> list[Any]:
        return await EtcdTokens(kv, keys).list()

    records = read_token_file(args.file) if args.file else _with_etcd(args, work)
    rows = [(r.id, r.name, r.role, ", ".join(r.models) or "*", _when(r.created)) for r in records]
    print(format_table(("ID", "NAME", "ROLE", "MODELS", "CREATED"), rows))
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    async def work(kv: EtcdKV, keys: Keys) -> None:
        # One transaction: every id is checked first, and either all go or none does.
        await EtcdTokens(kv, keys).revoke_many(args.ids)

    def without(records: list[Any]) -> list[Any]:
        unknown = set(args.ids) - {r.id for r in records}
        if unknown:
            raise NotFound(
                f"no token in {args.file} has id {', '.join(sorted(unknown))}, so none was "
                "revoked; `llmesh tokens list --file` shows the ids"
            )
        return [r for r in records if r.id not in args.ids]

    if args.file:
        update_token_file(args.file, without)
    else:
        _with_etcd(args, work)
    print(t(f"revoked {', '.join(args.ids)}", f"已吊销 {', '.join(args.ids)}"))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    async def work(kv: EtcdKV, keys: Keys) -> list[AuditEntry]:
        return await read_audit(kv, keys, limit=args.limit)

    entries = _with_etcd(args, work)
    if args.json:
        for entry in entries:
            sys.stdout.write(entry.to_json().decode() + "\n")
        return 0
    rows = [
        (
            _when(e.time),
            e.who,
            e.method.rsplit("/", 1)[-1],
            json.dumps(e.request, sort_keys=True, ensure_ascii=False)[:80],
            e.peer,
            e.code + (f": {e.message[:60]}" if e.message else ""),
        )
        for e in entries
    ]
    print(format_table(("WHEN", "WHO", "WHAT", "REQUEST", "FROM", "OUTCOME"), rows))
    return 0


def _etcd_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--etcd",
        default=None,
        help=t("etcd HOST:PORT (default $LLMESH_ETCD)", "etcd 地址 HOST:PORT（默认 $LLMESH_ETCD）"),
    )
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help=t("etcd key namespace", "etcd 键的命名空间")
    )
    add_etcd_arguments(parser)


def _file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--file",
        default=None,
        help=t(
            "keep the records in this JSON file instead of etcd (servers read it with "
            "--token-file)",
            "把令牌记录保存在此 JSON 文件而非 etcd（服务端用 --token-file 读取）",
        ),
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("give 0 (all) or a positive number")
    return value


def add_security_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tokens create|list|revoke`` and ``audit``.

    Args:
        subparsers: the ``llmesh`` parser's subcommands.
    """
    tokens = subparsers.add_parser(
        "tokens",
        help=t(
            "create, list and revoke bearer tokens (needs etcd access)",
            "创建、列出和吊销访问令牌（需要 etcd 访问权限）",
        ),
    )
    actions = tokens.add_subparsers(dest="tokens_command", metavar="ACTION")
    actions.required = True

    create = actions.add_parser("create", help=t("create a token", "创建令牌"))
    create.add_argument(
        "--role",
        choices=ROLES,
        default=ROLE_USER,
        help=t(
            "admin: everything; user: inference and reads (default)",
            "admin：全部操作；user：推理与只读调用（默认）",
        ),
    )
    create.add_argument("--name", required=True, help=t("who holds it", "令牌持有者"))
    create.add_argument(
        "--model",
        action="append",
        default=None,
        help=t(
            "limit the token to this model (repeatable; default: every model)",
            "只允许使用此模型（可重复；默认：所有模型）",
        ),
    )
    create.add_argument(
        "--quiet", action="store_true", help=t("print the token only", "只打印令牌")
    )
    _etcd_options(create)
    _file_option(create)
    create.set_defaults(func=_cmd_create)

    listing = actions.add_parser(
        "list", help=t("list tokens (never their secrets)", "列出令牌（不含密钥）")
    )
    _etcd_options(listing)
    _file_option(listing)
    listing.set_defaults(func=_cmd_list)

    revoke = actions.add_parser("revoke", help=t("revoke tokens by id", "按 id 吊销令牌"))
    revoke.add_argument("ids", nargs="+", metavar="ID")
    _etcd_options(revoke)
    _file_option(revoke)
    revoke.set_defaults(func=_cmd_revoke)

    audit = subparsers.add_parser(
        "audit",
        help=t(
            "show the audit log of admin calls (needs etcd access)",
            "显示管理操作的审计日志（需要 etcd 访问权限）",
        ),
    )
    audit.add_argument(
        "--limit",
        type=_positive,
        default=50,
        help=t("newest entries to show (0: all; default 50)", "显示最新的条数（0：全部；默认 50）"),
    )
    audit.add_argument(
        "--json", action="store_true", help=t("one JSON object a line", "每行一个 JSON 对象")
    )
    _etcd_options(audit)
    audit.set_defaults(func=_cmd_audit)
