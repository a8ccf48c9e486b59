"""`llmprune push` against a local HTTP server that records the calls huggingface_hub makes
(create-repo, preupload, commit), so the real client code runs end to end."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmprune.cli import main


class _Recorder(BaseHTTPRequestHandler):
    calls: list  # set per server
    status: int = 200

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.calls.append(("GET", self.path, self.headers.get("authorization"), None))
        self._reply(404, {"error": "not found"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.calls.append(("POST", self.path, self.headers.get("authorization"), body))
        if self.server.status != 200:
            return self._reply(self.server.status, {"error": "Invalid credentials"})
        if self.path == "/api/repos/create":
            req = json.loads(body)
            host, port = self.server.server_address[:2]
            return self._reply(200, {"url": f"http://{host}:{port}/{req.get('organization')}/"
                                            f"{req['name']}", "name": req["name"]})
        if self.path == "/api/validate-yaml":  # the client checks the card's front matter
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                "shouldIgnore": False} for f in files]})
        if "/commit/" in self.path:
            host, port = self.server.server_address[:2]
            return self._reply(200, {"commitUrl": f"http://{host}:{port}/alice/x/commit/1",
                                     "commitOid": "1" * 40,
                                     "pullRequestUrl": None})
        return self._reply(404, {"error": "unexpected"})


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.calls, server.status = [], 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_test_token")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, checkpoint_dir, text_file):
    out = tmp_path_factory.mktemp("push") / "wanda24"
    assert main(["-q", "wanda", "--model", str(checkpoint_dir), "--pattern", "2:4",
                 "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32",
                 "--output", str(out)]) == 0
    return out


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_push_creates_repo_and_uploads_files_and_card(hub, pruned_dir, capsys):
    before = _snapshot(pruned_dir)
    assert main(["-q", "push", str(pruned_dir), "--repo-id", "alice/tiny-wanda-24"]) == 0
    assert _snapshot(pruned_dir) == before  # the local output is never modified

    posts = [c for c in hub.calls if c[0] == "POST"]
    create = [c for c in posts if c[1] == "/api/repos/create"]
    assert len(create) == 1
    req = json.loads(create[0][3])
    assert req["name"] == "tiny-wanda-24" and req["organization"] == "alice"
    assert all(c[2] == "Bearer hf_secret_test_token" for c in posts)

    commit = [c for c in posts if c[1].startswith("/api/models/alice/tiny-wanda-24/commit/")]
    assert len(commit) == 1
    lines = [json.loads(line) for line in commit[0][3].decode().splitlines()]
    files = {v["value"]["path"]: base64.b64decode(v["value"]["content"])
             for v in lines if v["key"] == "file"}
    local = {p.name for p in pruned_dir.iterdir()}
    assert set(files) == local | {"README.md"}
    assert files["model.safetensors"] == (pruned_dir / "model.safetensors").read_bytes()

    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "- pruned" in card and "- wanda" in card and "- 2of4-sparsity" in card
    assert "| down_proj | 0.5000 |" in card
    assert "AutoModelForCausalLM.from_pretrained(\"alice/tiny-wanda-24\")" in card
    assert '"method": "wanda"' in card
    assert "hf_secret_test_token" not in card + capsys.readouterr().out


def test_dry_run_makes_no_http_call(hub, pruned_dir, capsys):
    assert main(["-q", "push", str(pruned_dir), "--repo-id", "alice/x", "--dry-run"]) == 0
    assert hub.calls == []
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "README.md" in out and "generated model card" in out
    size = (pruned_dir / "model.safetensors").stat().st_size
    assert f"{size:,d} B" in out


def test_auth_failure_is_one_line(hub, pruned_dir, capsys):
    hub.status = 401
    assert main(["-q", "push", str(pruned_dir), "--repo-id", "alice/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_TOKEN" in err and "hf_secret" not in err


def test_unreachable_hub_is_one_line(pruned_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert main(["-q", "push", str(pruned_dir), "--repo-id", "alice/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach" in err


def test_bad_repo_id(pruned_dir, capsys):
    assert main(["-q", "push", str(pruned_dir), "--repo-id", "no-slash"]) == 2
    assert "user/name" in capsys.readouterr().err
