"""TLS, mutual TLS and bearer tokens on real server processes, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as vllm_pb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vllm_grpc

from helpers import BIN, server_log, start_server
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc
from tandem.v1 import info_pb2, info_pb2_grpc

TOKEN = "s3cret-token-never-logged-7f3a"
PROMPT = "quokka sentinel phrase"


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(name: str, key, issuer_name: str, issuer_key, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, a client certificate from the CA and one from a stranger CA."""
    d = tmp_path_factory.mktemp("pki")
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client", "rogue_ca", "rogue")}
    certs = {
        "ca": _cert("tandem test CA", keys["ca"], "tandem test CA", keys["ca"], ca=True),
        "server": _cert("localhost", keys["server"], "tandem test CA", keys["ca"], server=True),
        "client": _cert("client", keys["client"], "tandem test CA", keys["ca"]),
        "rogue_ca": _cert("rogue CA", keys["rogue_ca"], "rogue CA", keys["rogue_ca"], ca=True),
        "rogue": _cert("rogue", keys["rogue"], "rogue CA", keys["rogue_ca"]),
    }
    paths = {}
    for name in certs:
        (d / f"{name}.pem").write_bytes(_pem(certs[name]))
        (d / f"{name}.key").write_bytes(_pem(keys[name]))
        paths[name], paths[f"{name}_key"] = d / f"{name}.pem", d / f"{name}.key"
    (d / "tokens").write_text(f"# tokens for the test\n{TOKEN}\nops second-token\n")  # the second is named
    paths["tokens"] = d / "tokens"
    return paths


def _secure(target: str, pki, client: str | None = None) -> grpc.Channel:
    chain = key = None
    if client:
        chain, key = pki[client].read_bytes(), pki[f"{client}_key"].read_bytes()
    creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), private_key=key, certificate_chain=chain)
    return grpc.secure_channel(target, creds)


def _generate(channel: grpc.Channel, token: str | None = None) -> pb.GenerateResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    return pb_grpc.GenerationServiceStub(channel).Generate(
        pb.GenerateRequest(
            text=PROMPT,
            sampling=pb.SamplingParams(temperature=0),
            stopping=pb.StoppingCriteria(max_new_tokens=4, ignore_eos=True),
        ),
        metadata=metadata,
        timeout=30,
    )


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_tls_with_bearer_tokens(pki) -> None:
    proc, target = start_server(
        "--model",
        "tiny-llama",
        "--tls-cert",
        str(pki["server"]),
        "--tls-key",
        str(pki["server_key"]),
        "--auth-token-file",
        str(pki["tokens"]),
    )
    try:
        with _secure(target, pki) as channel:
            assert len(_generate(channel, TOKEN).token_ids) == 4
            assert len(_generate(channel, "second-token").token_ids) == 4
            assert _code(lambda: _generate(channel)) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: _generate(channel, TOKEN + "x")) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: _generate(channel, "")) == grpc.StatusCode.UNAUTHENTICATED
            # Probes need no token.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        cli = subprocess.run(
            [
                str(BIN / "tandem"),
                "generate",
                PROMPT,
                "--target",
                target,
                "--tls-ca",
                str(pki["ca"]),
                "--auth-token-file",
                str(pki["tokens"]),
                "--max-new-tokens",
                "3",
                "--stats",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0 and "3 tokens" in cli.stderr, cli.stderr
        with grpc.insecure_channel(target) as plain:  # a plaintext client cannot talk to a TLS port
            assert _code(lambda: _generate(plain, TOKEN)) == grpc.StatusCode.UNAVAILABLE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log = server_log(proc)
        assert '"unauthenticated"' in log and TOKEN not in log and "second-token" not in log
        received = [json.loads(line) for line in log.splitlines() if '"request_received"' in line]
        assert [r.get("tenant") for r in received].count("ops") == 1  # the named token's request
        assert "quokka" not in log  # no prompt or output text without --log-prompts
    finally:
        proc.kill()


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(pki) -> None:
    proc, target = start_server(
        "--model",
        "tiny-llama",
        "--tls-cert",
        str(pki["server"]),
        "--tls-key",
        str(pki["server_key"]),
        "--tls-client-ca",
        str(pki["ca"]),
        "--log-prompts",
    )
    try:
        with _secure(target, pki, "client") as channel:
            assert len(_generate(channel).token_ids) == 4
        with _secure(target, pki) as channel:  # no client certificate
            assert _code(lambda: _generate(channel)) == grpc.StatusCode.UNAVAILABLE
        with _secure(target, pki, "rogue") as channel:  # a certificate from a CA the server does not trust
            assert _code(lambda: _generate(channel)) == grpc.StatusCode.UNAVAILABLE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert PROMPT in server_log(proc)  # --log-prompts puts the text in
    finally:
        proc.kill()


def test_tls_flags_are_checked_before_serving(pki, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="go together"):
        start_server("--model", "tiny-llama", "--tls-cert", str(pki["server"]))
    # Before the model loads: on an empty preset cache nothing gets built, and the exit is 2.
    env = {**os.environ, "TANDEM_CACHE_DIR": str(tmp_path)}
    args = [str(BIN / "tandem"), "serve", "--port", "0", "--tls-key", str(pki["server_key"])]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "--tls-cert and --tls-key go together" in res.stderr, res.stderr
    assert not any(tmp_path.iterdir()), "the model was loaded before the flags were checked"


def _auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_every_rpc_needs_a_token_and_aborts_stay_with_their_credential(pki) -> None:
    proc, target = start_server(
        "--model", "tiny-llama", "--auth-token-file", str(pki["tokens"]), "--max-health-watches-per-peer", "2"
    )  # fmt: skip
    try:
        with grpc.insecure_channel(target) as channel:
            gen = pb_grpc.GenerationServiceStub(channel)
            info = info_pb2_grpc.InfoServiceStub(channel)
            stream_req = pb.GenerateStreamRequest(text=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=2))
            unauthenticated = [
                lambda: list(gen.GenerateStream(stream_req, timeout=30)),
                lambda: gen.Abort(pb.AbortRequest(request_ids=["x"]), timeout=30),
                lambda: gen.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=30),
                lambda: info.GetModelInfo(info_pb2.GetModelInfoRequest(), timeout=30),
                lambda: info.GetServerInfo(info_pb2.GetServerInfoRequest(), timeout=30),
                lambda: info.GetLoad(info_pb2.GetLoadRequest(), timeout=30),
            ]
            assert [_code(call) for call in unauthenticated] == [grpc.StatusCode.UNAUTHENTICATED] * 6
            assert gen.Tokenize(pb.TokenizeRequest(text=PROMPT), metadata=_auth(TOKEN), timeout=30).token_ids

            def long(rid: str) -> pb.GenerateStreamRequest:
                stopping = pb.StoppingCriteria(max_new_tokens=300, ignore_eos=True)
                return pb.GenerateStreamRequest(request_id=rid, text=PROMPT, stopping=stopping)

            # Another credential's Abort leaves the request running, and looks the same as a real one.
            mine = gen.GenerateStream(long("mine"), metadata=_auth(TOKEN), timeout=120)
            next(mine)
            assert gen.Abort(pb.AbortRequest(request_ids=["mine"]), metadata=_auth("second-token"), timeout=30)
            vllm = vllm_grpc.VllmEngineStub(channel)  # smg's protocol scopes aborts the same way
            vllm.Abort(vllm_pb.AbortRequest(request_ids=["mine"]), metadata=_auth("second-token"), timeout=30)
            rest = list(mine)
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
            # Its own credential may abort it.
            mine = gen.GenerateStream(long("mine-2"), metadata=_auth(TOKEN), timeout=120)
            next(mine)
            gen.Abort(pb.AbortRequest(request_ids=["mine-2"]), metadata=_auth(TOKEN), timeout=30)
            assert list(mine)[-1].finish_reason == pb.FINISH_REASON_ABORTED

            # Health Watch streams are bounded per client address.
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(2)]
            assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
            third = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            with pytest.raises(grpc.RpcError) as err:
                next(third)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            watches[0].cancel()
            time.sleep(0.5)
            again = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(again).status == health_pb2.HealthCheckResponse.SERVING
            again.cancel()
            watches[1].cancel()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
