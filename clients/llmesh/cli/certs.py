"""``llmesh certs init DIR``: a private CA and certificates for a quick secure mesh."""

from __future__ import annotations

import argparse
import sys

from llmesh.i18n import t


def _cmd_init(args: argparse.Namespace) -> int:
    from llmesh.common.certs import init_certs

    try:
        pairs = init_certs(args.dir, hosts=args.host or (), force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ca = pairs["ca"]
    print(
        t(
            f"CA          {ca.cert} (key {ca.key}: keep it offline)",
            f"CA          {ca.cert}（私钥 {ca.key}：请离线保存）",
        )
    )
    for name, pair in pairs.items():
        if name != "ca":
            print(f"{name:<12}{pair.cert}  {pair.key}")
    d = ca.cert.parent
    print(
        t(
            "\nServe with:  --tls-cert {d}/control-plane.pem --tls-key {d}/control-plane.key "
            "--tls-ca {d}/ca.pem --tls-require-client-cert\n"
            "Clients:     LLMESH_TLS_CA={d}/ca.pem LLMESH_TLS_CERT={d}/client.pem "
            "LLMESH_TLS_KEY={d}/client.key",
            "\n服务端：  --tls-cert {d}/control-plane.pem --tls-key {d}/control-plane.key "
            "--tls-ca {d}/ca.pem --tls-require-client-cert\n"
            "客户端：  LLMESH_TLS_CA={d}/ca.pem LLMESH_TLS_CERT={d}/client.pem "
            "LLMESH_TLS_KEY={d}/client.key",
        ).format(d=d)
    )
    return 0


def add_certs_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``llmesh certs init``.

    Args:
        subparsers: the ``llmesh`` parser's subcommands.
    """
    certs = subparsers.add_parser(
        "certs", help=t("make TLS certificates for the mesh", "为网格生成 TLS 证书")
    )
    sub = certs.add_subparsers(dest="certs_command", metavar="COMMAND")
    sub.required = True
    init = sub.add_parser(
        "init",
        help=t(
            "make a CA and certificates for the control plane, workers, etcd and a client",
            "生成 CA 以及控制平面、工作节点、etcd 和客户端的证书",
        ),
    )
    init.add_argument("dir", help=t("directory to write them to", "写入的目录"))
    init.add_argument(
        "--host",
        action="append",
        default=[],
        help=t(
            "another host name or IP the certificates name (repeatable; localhost, 127.0.0.1, "
            "::1 and this machine's name are always in)",
            "证书中额外包含的主机名或 IP（可重复；localhost、127.0.0.1、::1 和本机名总会包含）",
        ),
    )
    init.add_argument(
        "--force",
        action="store_true",
        help=t("replace an existing CA in DIR", "替换 DIR 中已有的 CA"),
    )
    init.set_defaults(func=_cmd_init)
