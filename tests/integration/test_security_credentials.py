# ruff: noqa: F811  (the secure_nats fixture is imported and used as a parameter)
"""Bus credentials: wrong or missing ones refused, passwords from files, TLS, NKeys and
creds files on an operator-mode server, and settings checked and named without their
values."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from autoserve_runtime.bus import (
    NatsAuth,
    NatsConfigError,
    absorb_url_credentials,
    connect,
    redact_url,
)

from ..conftest import plant_secret
from ..support.secure_nats import (
    NATS_CONF,
    ROOT,
    SecureNats,
    secure_nats,  # noqa: F401  (a fixture)
)
from .conftest import LOCALHOST


async def test_wrong_or_missing_credentials_are_refused(secure_nats: SecureNats) -> None:
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await nats.connect(secure_nats.url, user="prober", password="wrong", max_reconnect_attempts=0,
                           allow_reconnect=False, connect_timeout=5)  # fmt: skip
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await nats.connect(secure_nats.url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=5)


async def test_credentials_from_files_and_tls(
    tmp_path: Path, secure_nats: SecureNats, named_cert: tuple[Path, Path]
) -> None:
    env = secure_nats.env("prober", tmp_path)
    auth = NatsAuth.from_env(env)
    assert secure_nats.passwords["prober"] not in repr(auth) + str(auth)
    assert repr(auth) == "user prober, inbox _INBOX_prober"
    nc = await connect(secure_nats.url, "from-file", timeout=10, auth=auth)
    await nc.close()
    # TLS: a server with the (optional) tls block, a client trusting its CA.
    cert, key = named_cert
    conf = tmp_path / "tls.conf"
    conf.write_text(NATS_CONF.read_text() + f'tls {{ cert_file: "{cert}", key_file: "{key}", timeout: 2 }}\n')
    tls_server = SecureNats(tmp_path / "tls-nats", conf=conf, passwords=secure_nats.passwords).start()
    try:
        secure = NatsAuth.from_env({**env, "AUTOSERVE_NATS_TLS_CA": str(cert)})
        assert repr(secure) == "user prober, tls, inbox _INBOX_prober"
        nc = await connect(f"tls://{LOCALHOST}:{tls_server.port}", "tls", timeout=10, auth=secure)
        assert nc.is_connected
        await nc.close()
        with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):  # no CA: the self-signed cert is untrusted
            await connect(f"tls://{LOCALHOST}:{tls_server.port}", "tls", timeout=5,
                          auth=NatsAuth.from_env(env), max_reconnect_attempts=0, allow_reconnect=False)  # fmt: skip
    finally:
        tls_server.stop()


def test_credential_settings_are_checked_and_named_without_their_values(tmp_path: Path) -> None:
    with pytest.raises(NatsConfigError, match="AUTOSERVE_NATS_PASSWORD and AUTOSERVE_NATS_PASSWORD_FILE"):
        NatsAuth.from_env({"AUTOSERVE_NATS_USER": "u", "AUTOSERVE_NATS_PASSWORD": "s3cret",
                           "AUTOSERVE_NATS_PASSWORD_FILE": "/x"})  # fmt: skip
    with pytest.raises(NatsConfigError, match=r"AUTOSERVE_NATS_PASSWORD_FILE: cannot read /nonexistent/pw"):
        NatsAuth.from_env({"AUTOSERVE_NATS_USER": "u", "AUTOSERVE_NATS_PASSWORD_FILE": "/nonexistent/pw"})
    with pytest.raises(NatsConfigError, match="AUTOSERVE_NATS_PASSWORD is set but AUTOSERVE_NATS_USER is not"):
        NatsAuth.from_env({"AUTOSERVE_NATS_PASSWORD": "s3cret"})
    with pytest.raises(NatsConfigError, match=r"more than one NATS credential is set \(USER, TOKEN\)"):
        NatsAuth.from_env({"AUTOSERVE_NATS_USER": "u", "AUTOSERVE_NATS_TOKEN": "t"})
    with pytest.raises(NatsConfigError, match=r"AUTOSERVE_NATS_TLS_CA: no such file: /nonexistent/ca\.pem"):
        NatsAuth.from_env({"AUTOSERVE_NATS_TLS_CA": "/nonexistent/ca.pem"})
    for bad in ("_INBOX.>", "_INBOX_*", "_INBOX.", "my inbox"):
        with pytest.raises(NatsConfigError, match=r"AUTOSERVE_NATS_INBOX_PREFIX: .* is not a subject prefix"):
            NatsAuth.from_env({"AUTOSERVE_NATS_INBOX_PREFIX": bad})
    mine = NatsAuth.from_env({"AUTOSERVE_NATS_INBOX_PREFIX": "_INBOX_detector"})
    assert mine.options() == {"inbox_prefix": "_INBOX_detector"} and repr(mine) == "none, inbox _INBOX_detector"
    assert NatsAuth.from_env({}).options() == {}  # nats-py's default, _INBOX
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    auth = NatsAuth.from_env({"AUTOSERVE_NATS_TOKEN_FILE": str(token)})
    assert auth.options() == {"token": "tok-123"} and repr(auth) == "token"
    try:
        NatsAuth.from_env(
            {"AUTOSERVE_NATS_USER": "u", "AUTOSERVE_NATS_PASSWORD": "s3cret", "AUTOSERVE_NATS_TOKEN": "x"}
        )
    except NatsConfigError as exc:
        assert "s3cret" not in str(exc)


def test_urls_with_credentials_are_redacted_and_their_credentials_moved_to_the_environment() -> None:
    assert redact_url("nats://svc:s3cret@nats.example:4222") == "nats://***@nats.example:4222"
    assert redact_url("tls://tok@nats.example") == "tls://***@nats.example"
    assert redact_url("nats://nats.example:4222") == "nats://nats.example:4222"
    env: dict[str, str] = {}
    assert absorb_url_credentials("nats://svc:s3cret@nats.example:4222", env) == "nats://nats.example:4222"
    assert env == {"AUTOSERVE_NATS_USER": "svc", "AUTOSERVE_NATS_PASSWORD": "s3cret"}
    env = {}
    assert absorb_url_credentials("nats://tok@h:1", env) == "nats://h:1" and env == {"AUTOSERVE_NATS_TOKEN": "tok"}
    assert absorb_url_credentials(None, env) is None


def test_the_committed_nats_config_is_the_generated_one() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_nats_conf.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\nregenerate with: make deploy-config"


async def signed_in_round_trip(nc: Client) -> None:
    """A message published and received on the signed-in connection, which is then closed."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_message(msg: Msg) -> None:
        if not got.done():
            got.set_result(msg.data)

    await nc.subscribe("autoserve.auth.check", cb=on_message)
    await nc.publish("autoserve.auth.check", b"signed in")
    assert await asyncio.wait_for(got, 10) == b"signed in"
    await nc.close()


async def test_an_nkey_user_connects_with_its_seed_file_and_a_wrong_seed_is_refused(tmp_path: Path) -> None:
    """AUTOSERVE_NATS_NKEY: the server knows the user only by its public key; the client
    signs the server's nonce with the seed (nats-py's nkeys extra, installed)."""
    import nkeys

    def seed_file(name: str) -> tuple[Path, str]:
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        path = tmp_path / f"{name}.nk"
        plant_secret(seed, f"nkey seed of {name}", allowed_in=[path])
        path.write_bytes(seed + b"\n")
        path.chmod(0o600)
        return path, nkeys.from_seed(bytearray(seed)).public_key.decode()

    good, public = seed_file("service")
    wrong, _ = seed_file("stranger")
    conf = tmp_path / "nkey.conf"
    conf.write_text(f'jetstream {{}}\nauthorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    server = SecureNats(tmp_path / "nkey-nats", conf=conf).start()
    try:
        auth = NatsAuth.from_env({"AUTOSERVE_NATS_NKEY": str(good)})
        assert repr(auth) == "nkey" and good.read_text().strip() not in repr(auth) + str(auth.describe())
        nc = await connect(server.url, "nkey", timeout=10, auth=auth)
        await signed_in_round_trip(nc)
        with pytest.raises((nats.errors.Error, OSError)):
            await connect(server.url, "stranger", timeout=5, auth=NatsAuth.from_env({"AUTOSERVE_NATS_NKEY": str(wrong)}),
                          max_reconnect_attempts=0, allow_reconnect=False)  # fmt: skip
    finally:
        server.stop()


def signed_jwt(issuer: Any, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (v2) signed by ``issuer``'s nkey, as ``nsc`` writes them."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    claims = {"iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name, "sub": subject,
              "nats": {"version": 2, **nats_claims}}  # fmt: skip
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
    header = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    signed = f"{header}.{b64(json.dumps(claims).encode())}"
    return f"{signed}.{b64(issuer.sign(signed.encode()))}"


async def test_a_creds_file_signs_in_on_an_operator_mode_server_and_an_untrusted_one_is_refused(tmp_path: Path) -> None:
    """AUTOSERVE_NATS_CREDS: a user JWT and its seed in one file (the decentralised auth of
    ``nsc``). The operator trusts one account; a user issued by another is refused."""
    import nkeys

    def keypair(prefix: int) -> tuple[bytes, Any]:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return seed, nkeys.from_seed(bytearray(seed))

    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
                 "conn": -1, "leaf": -1}  # fmt: skip
    _, operator = keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, stranger = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    account_pub = account.public_key.decode()
    conf = tmp_path / "operator.conf"
    conf.write_text(
        f'operator: "{signed_jwt(operator, operator.public_key.decode(), "test", {"type": "operator"})}"\n'
        f"resolver: MEMORY\n"
        f'resolver_preload: {{ {account_pub}: "{signed_jwt(operator, account_pub, "autoserve", {"type": "account", "limits": unlimited})}" }}\n'
    )

    def creds(name: str, issuer: Any) -> Path:
        seed, user = keypair(nkeys.PREFIX_BYTE_USER)
        token = signed_jwt(issuer, user.public_key.decode(), name, {"type": "user", "pub": {}, "sub": {},
                                                                     "subs": -1, "data": -1, "payload": -1})  # fmt: skip
        path = tmp_path / f"{name}.creds"
        plant_secret(seed, f"creds seed of {name}", allowed_in=[path])
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
                        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n")  # fmt: skip
        path.chmod(0o600)
        return path

    good, untrusted = creds("prober", account), creds("intruder", stranger)
    server = SecureNats(tmp_path / "operator-nats", conf=conf).start()
    try:
        auth = NatsAuth.from_env({"AUTOSERVE_NATS_CREDS": str(good)})
        assert repr(auth) == "creds file"
        nc = await connect(server.url, "creds", timeout=10, auth=auth)
        await signed_in_round_trip(nc)
        with pytest.raises((nats.errors.Error, OSError)):
            await connect(server.url, "intruder", timeout=5,
                          auth=NatsAuth.from_env({"AUTOSERVE_NATS_CREDS": str(untrusted)}),
                          max_reconnect_attempts=0, allow_reconnect=False)  # fmt: skip
    finally:
        server.stop()
