"""A private CA and certificates for a quick secure mesh (``llmesh certs init DIR``).

Made with the ``cryptography`` library (the maintained X.509 toolkit Python's ecosystem uses;
no openssl subprocess). Keys are ECDSA P-256: fast to make, and accepted by gRPC's BoringSSL
and by etcd's Go TLS alike. Every component certificate carries both the serverAuth and
clientAuth extended key usages, so a process presents the same pair as a server and as a client
(mTLS), and names localhost, 127.0.0.1, ::1, this machine's host name and any ``hosts`` given,
which is what clients check against the address they dial. The ``client`` certificate, the one
handed to users, has clientAuth only and names no host: it cannot impersonate a server.

An organisation's own CA replaces all of this: give each process a certificate it signed (with
those usages and names) and its CA bundle as ``--tls-ca``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The certificates ``llmesh certs init`` makes besides the CA: one per component and a client.
COMPONENTS = ("control-plane", "inference-worker", "trainer-worker", "etcd", "client")
#: The user-facing certificate: client authentication only, no host names.
CLIENT = "client"
CA_DAYS = 3650
LEAF_DAYS = 825


@dataclass(frozen=True)
class CertPair:
    """A certificate and its key on disk."""

    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # A fresh file, created 0600: a key must never be readable by others, not even briefly.
    # Truncating an existing file would keep its old mode (--force over a 0644 key), and
    # opening a symlink would write the key wherever it points.
    _remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _remove(path)  # never write through a symlink
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _remove(path: Path) -> None:
    # unlink removes a symlink itself, not its target.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    seen: list[str] = []
    for host in ["localhost", "127.0.0.1", "::1", socket.gethostname(), *hosts]:
        host = host.strip().strip("[]")
        if host and host not in seen:
            seen.append(host)
    names: list[x509.GeneralName] = []
    for host in seen:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(directory: Path, *, name: str = "llmesh CA") -> CertPair:
    """Make a self-signed CA as ``ca.pem`` / ``ca.key`` in ``directory``."""
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair = CertPair(directory / "ca.pem", directory / "ca.key")
    _write_key(pair.key, key)
    _write_cert(pair.cert, cert)
    return pair


def make_leaf(
    directory: Path,
    ca: CertPair,
    name: str,
    hosts: Sequence[str] = (),
    *,
    server: bool = True,
) -> CertPair:
    """Make ``{name}.pem`` / ``{name}.key`` signed by ``ca``.

    Args:
        directory: where to write.
        ca: the CA's certificate and key.
        name: the certificate's common name and file stem.
        hosts: host names or IPs besides localhost, 127.0.0.1, ::1 and this machine's name.
        server: usable as a server certificate too (serverAuth, and the host names); False
            makes a client-only certificate (clientAuth, no subjectAltName).
    """
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                if server
                else [ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    pair = CertPair(directory / f"{name}.pem", directory / f"{name}.key")
    _write_key(pair.key, key)
    _write_cert(pair.cert, cert)
    return pair


def init_certs(
    directory: str | Path,
    *,
    hosts: Sequence[str] = (),
    names: Sequence[str] = COMPONENTS,
    force: bool = False,
) -> dict[str, CertPair]:
    """Make a CA and one certificate per name in ``directory`` (``llmesh certs init``).

    Args:
        directory: created if missing; set to mode 0700 either way.
        hosts: extra host names / IPs every server certificate names (e.g. the machine's
            public name); the ``client`` certificate names none.
        names: the leaf certificates to make.
        force: overwrite an existing CA; without it an existing ``ca.pem`` is an error, so a
            second run cannot silently invalidate certificates already handed out.

    Returns:
        ``{"ca": ..., name: ...}``: the pairs written.

    Raises:
        FileExistsError: ``directory`` already holds a CA and ``force`` is off.
    """
    path = Path(directory).expanduser()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is masked by the umask and ignored for an existing directory: set it.
    path.chmod(0o700)
    if (path / "ca.pem").exists() and not force:
        raise FileExistsError(
            f"{path} already holds a CA (ca.pem); pass --force to replace it and every "
            "certificate it signed"
        )
    ca = make_ca(path)
    out = {"ca": ca}
    for name in names:
        out[name] = make_leaf(path, ca, name, hosts, server=name != CLIENT)
    return out
