"""Serving browsers and HTTPS: `--allowed-origins` (CORS, Starlette's middleware outside the
API-key guard) and `--ssl-certfile` / `--ssl-keyfile` (uvicorn's TLS under the connection
guards), each checked before the model loads."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import httpx
import pytest

from qwen35.cli import main
from qwen35.errors import Qwen35Error
from qwen35.server.app import ServerConfig
from server_fakes import FakeEngine, serving, start_serve

PAGE = "http://localhost:3000"


@pytest.fixture
def serve():
    yield from serving()


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url + "/v1/chat/completions", headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})  # fmt: skip


def test_cors_lets_the_allowed_page_call_and_no_other(serve):
    srv, _ = serve(FakeEngine(), api_key="k", allowed_origins=(PAGE, "https://[::1]:8443"))
    # the browser's preflight carries no key: answered by the CORS layer, not refused with 401
    r = _preflight(srv.url, PAGE)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == PAGE
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    body = {"prompt": "hi", "max_tokens": 2}
    r = httpx.post(srv.url + "/v1/completions", json=body,
                   headers={"origin": PAGE, "authorization": "Bearer k"})  # fmt: skip
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    # the key is still required, and the page can read why it was refused
    r = httpx.post(srv.url + "/v1/completions", json=body, headers={"origin": PAGE})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == PAGE
    # another page: its preflight fails and no response names it
    r = _preflight(srv.url, "http://evil.example")
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.post(srv.url + "/v1/completions", json=body,
                   headers={"origin": "http://evil.example", "authorization": "Bearer k"})  # fmt: skip
    assert "access-control-allow-origin" not in r.headers
    assert _preflight(srv.url, "https://[::1]:8443").status_code == 200


def test_cors_off_by_default_and_star(serve):
    srv, _ = serve(FakeEngine())
    r = _preflight(srv.url, PAGE)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = httpx.get(srv.url + "/v1/models", headers={"origin": PAGE})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    srv, _ = serve(FakeEngine(), allowed_origins=("*",))
    r = httpx.get(srv.url + "/v1/models", headers={"origin": "http://anything:1"})
    assert r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("origin", ["localhost:3000", "http://localhost:3000/", "ftp://a", ""])
def test_bad_origin_refused_before_loading(origin, capsys):
    with pytest.raises(Qwen35Error, match="--allowed-origins"):
        ServerConfig(served_model_name="m", allowed_origins=(origin,))
    assert main(["serve", "--model", "/nonexistent", "--allowed-origins", origin]) == 2
    assert "is not an origin" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate and is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return d / "cert.pem", d / "key.pem"


def test_tls_flags_checked_before_loading(cert, tmp_path, capsys):
    crt, key = (str(p) for p in cert)
    assert main(["serve", "--model", "/nonexistent", "--ssl-certfile", crt]) == 2
    assert "both --ssl-certfile and --ssl-keyfile" in capsys.readouterr().err
    missing = str(tmp_path / "nope.pem")
    assert main(["serve", "--model", "/x", "--ssl-certfile", crt, "--ssl-keyfile", missing]) == 2
    assert f"--ssl-keyfile {missing}: no such file" in capsys.readouterr().err
    # a certificate given as the key
    assert main(["serve", "--model", "/x", "--ssl-certfile", crt, "--ssl-keyfile", crt]) == 2
    assert "cannot use --ssl-certfile" in capsys.readouterr().err
    # an encrypted key: refused before the model loads, saying what to give
    enc = str(tmp_path / "enc.pem")
    subprocess.run(["openssl", "pkey", "-in", key, "-aes256", "-passout", "pass:x", "-out", enc],
                   check=True, capture_output=True)  # fmt: skip
    assert main(["serve", "--model", "/x", "--ssl-certfile", crt, "--ssl-keyfile", enc]) == 2
    assert "unencrypted PEM private key" in capsys.readouterr().err


def test_https_under_the_connection_guards(cert):
    """The server's own uvicorn config (transport.py's guarded protocol) over TLS."""
    from qwen35.server.app import create_app
    from qwen35.server.transport import TransportLimits
    from server_fakes import ServerThread

    crt, key = (str(p) for p in cert)
    app = create_app(FakeEngine(), ServerConfig(served_model_name="tiny"))
    srv = ServerThread(app, transport=TransportLimits(timeout_headers_s=1.0), ssl_certfile=crt,
                       ssl_keyfile=key)  # fmt: skip
    url = srv.url.replace("http://", "https://")
    trust = ssl.create_default_context(cafile=crt)
    try:
        r = httpx.post(url + "/v1/completions", verify=trust, timeout=30,
                       json={"prompt": "Hi", "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        with pytest.raises(httpx.TransportError):  # not trusted without the certificate
            httpx.get(url + "/health", timeout=10)
        # a client that completes the handshake and then sends nothing gets the header timeout
        import socket

        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
            with trust.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert b"408" in tls.recv(4096)
    finally:
        srv.close()


@pytest.mark.slow
def test_serve_over_https(cert, tmp_path):
    from tiny import VOCAB_REAL, save_checkpoint

    crt, key = cert
    save_checkpoint(tmp_path / "m", vocab_size=VOCAB_REAL, hidden_size=32)
    trust = ssl.create_default_context(cafile=str(crt))
    proc, url = start_serve(tmp_path / "m", "--ssl-certfile", str(crt), "--ssl-keyfile", str(key),
                            "--max-memory", "256MiB", "--log-level", "warning", timeout=120,
                            verify=trust)  # fmt: skip
    try:
        assert url.startswith("https://")
        r = httpx.post(url + "/v1/completions", verify=trust, timeout=60,
                       json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port
            httpx.get(url.replace("https", "http") + "/health", timeout=10)
    finally:
        proc.terminate()
        proc.wait(30)
    assert "https://127.0.0.1" in proc.stdout.read()
