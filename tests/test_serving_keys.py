"""Key file parsing, the renewal decision, the keeper thread and the clients' retry after a refused key.

A fake server over real HTTP follows TorchServe 0.12's ``TokenAuthorization``: keys expire, ``/token`` with the API
key replaces one and rewrites ``key_file.json``, and a wrong or expired key gets 400 ``InvalidKeyException``.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tmu_core.config import Workspace
from tmu_core.errors import AuthError, InvalidInputError, ServerError
from tmu_core.serving.clients import InferenceClient, ManagementClient
from tmu_core.serving.keeper import KeyKeeper, RenewalSettings
from tmu_core.serving.keys import KeyRing, TokenKeys, parse_instant, parse_keys, read_keys
from tmu_core.serving.torchserve import TorchServeConfig, free_ports

DOC_EXAMPLE = """{"management": {"key": "B-E5KSRM", "expiration time": "2024-02-16T21:12:24.801167Z"},
 "inference": {"key": "gNRuA7dS", "expiration time": "2024-02-16T21:12:24.801148123Z"}, "API": {"key": "yv9uQajP"}}"""
REFUSED = {"code": 400, "type": "InvalidKeyException",
           "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}


class FakeTorchServe:
    """Token rules of TorchServe 0.12 on one loopback port (management and inference routes together)."""

    def __init__(self, key_file: Path, lifetime_s: float) -> None:
        self.key_file, self.lifetime_s = key_file, lifetime_s
        self.api = secrets.token_urlsafe(6)
        self.keys: dict[str, tuple[str, datetime]] = {}
        self.renewals = {"management": 0, "inference": 0}
        self.refused = 0
        self.file_delay_s = 0.0
        for kind in ("management", "inference"):
            self.rotate(kind, count=False)
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def rotate(self, kind: str, count: bool = True) -> None:
        expires = datetime.now(timezone.utc) + timedelta(seconds=self.lifetime_s)
        self.keys[kind] = (secrets.token_urlsafe(6), expires)
        self.renewals[kind] += count
        if self.file_delay_s:  # TorchServe switches keys in memory a moment before it rewrites the file
            threading.Timer(self.file_delay_s, self.write).start()
        else:
            self.write()

    def write(self) -> None:
        data = {kind: {"key": key, "expiration time": when.isoformat().replace("+00:00", "Z")}
                for kind, (key, when) in self.keys.items()}
        self.key_file.write_text(json.dumps({**data, "API": {"key": self.api}}, indent=2))

    def valid(self, kind: str, header: str) -> bool:
        key, expires = self.keys[kind]
        return header == f"Bearer {key}" and datetime.now(timezone.utc) < expires

    def answer(self, path: str, header: str) -> tuple[int, dict]:
        if path.startswith("/token"):
            kind = path.partition("type=")[2]
            if header != f"Bearer {self.api}" or kind not in self.keys:
                return 400, {**REFUSED, "message": "Token Authentication failed."}
            self.rotate(kind)
            return 200, {}
        kind = "inference" if path.startswith("/predictions") else "management"
        if not self.valid(kind, header):
            self.refused += 1
            return 400, REFUSED
        if kind == "inference":
            return 200, {"predictions": [{"class": "ant", "index": 0, "probability": 1.0}], "model_version": "1"}
        return 200, {"models": [{"modelName": "m", "modelUrl": "m-v1.mar"}]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                code, body = fake.answer(self.path, self.headers.get("Authorization", ""))
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def fake(tmp_path):
    server = FakeTorchServe(tmp_path / "key_file.json", lifetime_s=60.0)
    yield server
    server.close()


def _clients(fake: FakeTorchServe) -> tuple[ManagementClient, InferenceClient]:
    ring = KeyRing(fake.key_file, fake.url)
    return (ManagementClient(fake.url, None, timeout=5, keys=ring), InferenceClient(fake.url, None, timeout=5, keys=ring))


def _workspace_on(fake: FakeTorchServe, tmp_path: Path) -> Workspace:
    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    others = [p for p in free_ports(5) if p != int(fake.url.rsplit(":", 1)[1])][:4]
    TorchServeConfig(model_store=workspace.model_store, management_port=int(fake.url.rsplit(":", 1)[1]),
                     inference_port=others[0], metrics_port=others[1], grpc_inference_port=others[2],
                     grpc_management_port=others[3], token_expiration_min=1).write(
        workspace.serve_dir / "config.properties")
    (workspace.serve_dir / "key_file.json").write_text(fake.key_file.read_text())
    fake.key_file = workspace.serve_dir / "key_file.json"
    return workspace


def test_java_instants_parse_to_utc():
    assert parse_instant("2024-02-16T21:12:24.801148123Z") == datetime(2024, 2, 16, 21, 12, 24, 801148, timezone.utc)
    assert parse_instant("2024-02-16T21:12:24Z") == datetime(2024, 2, 16, 21, 12, 24, tzinfo=timezone.utc)
    with pytest.raises(InvalidInputError, match=r"expected an ISO-8601 UTC time ending in Z, got '2024-02-16T21:12:24'"):
        parse_instant("2024-02-16T21:12:24")
    with pytest.raises(InvalidInputError, match=r"like 2024-02-16T21:12:24.801167Z, got 'soon'"):
        parse_instant("soon")


def test_the_documented_key_file_parses(tmp_path):
    keys = parse_keys(DOC_EXAMPLE, tmp_path / "key_file.json")
    assert (keys.management, keys.inference, keys.api) == ("B-E5KSRM", "gNRuA7dS", "yv9uQajP")
    assert keys.expires("management") == datetime(2024, 2, 16, 21, 12, 24, 801167, timezone.utc)
    assert keys.key("inference") == "gNRuA7dS"
    with pytest.raises(InvalidInputError, match=r"token kind must be one of \['management', 'inference'\], got 'API'"):
        keys.key("API")


def test_a_malformed_or_missing_key_file_says_what_is_expected(tmp_path):
    with pytest.raises(ServerError, match=r"expected management, inference and API keys .* got '\{\"API\": \{\}\}'"):
        parse_keys('{"API": {}}', tmp_path / "k.json")
    with pytest.raises(ServerError, match=r"k.json: No such file or directory; is TorchServe running"):
        read_keys(tmp_path / "k.json")


def test_a_key_is_due_within_the_lead_time(tmp_path):
    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    keys = TokenKeys("m", "i", "a", tmp_path, now + timedelta(seconds=40), now + timedelta(seconds=20))
    assert keys.due(now) == ()
    assert keys.due(now, timedelta(seconds=30)) == ("inference",)
    assert keys.due(now + timedelta(minutes=5)) == ("management", "inference")
    assert TokenKeys("m", "i", "a", tmp_path).due(now) == ()


def test_renewal_settings_scale_with_the_lifetime():
    settings = RenewalSettings()
    assert settings.lead(3600) == timedelta(seconds=300) and settings.poll_s(3600) == 30
    assert settings.lead(60) == timedelta(seconds=30) and settings.poll_s(60) == 10
    with pytest.raises(InvalidInputError, match=r"max_poll_s must be > 0 seconds, got 0"):
        RenewalSettings(max_poll_s=0)


def test_the_keeper_renews_only_due_keys(fake, tmp_path):
    workspace = _workspace_on(fake, tmp_path)
    keeper = KeyKeeper(workspace)
    before = read_keys(fake.key_file)
    assert keeper.check() == ()
    assert keeper.check(datetime.now(timezone.utc) + timedelta(seconds=35)) == ("management", "inference")
    after = read_keys(fake.key_file)
    assert after.management != before.management and after.inference != before.inference
    assert after.expires("management") > before.expires("management")
    assert fake.renewals == {"management": 1, "inference": 1}


def test_the_keeper_waits_while_no_server_runs(tmp_path):
    assert KeyKeeper(Workspace(home=tmp_path / "h", model_store=tmp_path / "s")).check() == ()


def test_the_keeper_thread_keeps_short_lived_keys_valid_and_stops(tmp_path):
    fake = FakeTorchServe(tmp_path / "key_file.json", lifetime_s=0.6)
    try:
        keeper = KeyKeeper(_workspace_on(fake, tmp_path), RenewalSettings(max_lead_s=0.3, max_poll_s=0.05)).start()
        management, inference = _clients(fake)
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert inference.predict("m", b"x").model_version == "1"
            assert [m.name for m in management.list_models()] == ["m"]
            time.sleep(0.02)
        started = time.monotonic()
        keeper.stop(timeout=2)
        assert time.monotonic() - started < 1 and keeper._thread is None
        assert fake.renewals["management"] >= 3 and fake.renewals["inference"] >= 3 and keeper.failures == 0
    finally:
        fake.close()


def test_an_expired_key_nobody_renewed_is_renewed_by_the_client(fake):
    management, inference = _clients(fake)
    fake.keys = {kind: (key, datetime.now(timezone.utc) - timedelta(seconds=1)) for kind, (key, _) in fake.keys.items()}
    fake.write()
    assert inference.predict("m", b"x").model_version == "1"
    assert [m.name for m in management.list_models()] == ["m"]
    assert fake.refused == 2 and fake.renewals == {"management": 1, "inference": 1}


def test_a_key_renewed_elsewhere_is_picked_up_after_one_refusal(fake):
    _, inference = _clients(fake)
    assert inference.predict("m", b"x").model_version == "1"
    fake.file_delay_s = 0.1
    fake.rotate("inference")  # by another process; the file lags behind the server
    assert inference.predict("m", b"x").model_version == "1"
    assert fake.refused == 1 and fake.renewals["inference"] == 1  # the client renewed nothing itself


def test_a_failed_renewal_says_what_failed_and_what_to_do(fake):
    _, inference = _clients(fake)
    fake.keys["inference"] = (fake.keys["inference"][0], datetime.now(timezone.utc) - timedelta(seconds=1))
    fake.api = "other-run"
    fake.write()
    fake.api = "this-run"
    with pytest.raises(AuthError, match=r"POST /predictions/m: TorchServe refused the inference key and it could not "
                                         r"be renewed: renewing the TorchServe inference key .* refused the API key .*"
                                         r"restart it with tmu-admin serve stop && tmu-admin serve start"):
        inference.predict("m", b"x")


def test_a_client_with_a_fixed_token_does_not_retry(fake):
    with pytest.raises(AuthError, match="Token Authorization failed"):
        InferenceClient(fake.url, "stale").predict("m", b"x")
    assert fake.refused == 1
