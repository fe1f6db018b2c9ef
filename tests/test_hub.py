"""Hub push end to end: the real huggingface_hub client against a local HTTP server speaking the Hub's upload API
(repo create, validate-yaml, preupload, LFS batch + basic PUT + verify, commit), started by the test.

The server is the only stand-in: it decides upload modes as the Hub does (binary or > 10 MB -> LFS), stores what
it receives and records every request, so the test checks bytes, transfer path, auth header and the absence of the
token everywhere else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from paretoq_export import hub as H

TOKEN = "hf_pushtest_" + "Zq4T" * 7  # token-shaped; must reach the server's Authorization header and nothing else
LARGE = 11 * 1000 * 1000  # > 10 MB: the LFS path whatever the content


class FakeHub:
    """Records requests; implements the endpoints huggingface_hub 2.x calls for create_repo + upload_folder
    (legacy LFS path, Xet disabled)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}  # oid -> bytes received through the basic transfer PUT
        self.commits: list[dict] = []
        self.upload_modes: dict[str, str] = {}
        self.branches: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        n = int(self.rfile.readline().split(b";")[0], 16)
                        if n == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(n)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_GET(self):
                self._handle("GET")

            def _handle(self, method: str) -> None:
                body = self._body()
                hub.requests.append({"method": method, "path": self.path,
                                     "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body})
                try:
                    status, payload = hub.route(method, self.path.split("?")[0], body, self.headers)
                except Exception as exc:  # noqa: BLE001 - a server bug shows as a 500 with its message
                    status, payload = 500, {"error": repr(exc)}
                self._reply(status, payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, method: str, path: str, body: bytes, headers):
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization'] or 'anon'}/{payload['name']}" if payload.get("organization") \
                else payload["name"]
            self.repos[repo_id] = payload
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if method == "POST" and path.startswith("/api/models/") and "/branch/" in path:
            repo, branch = path[len("/api/models/"):].split("/branch/", 1)
            self.branches.append((repo, branch))
            return 200, {}
        if method == "POST" and path == "/api/validate-yaml":
            import yaml

            content = json.loads(body)["content"]
            yaml.safe_load(content.split("---\n")[1])  # front matter must parse
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and "/preupload/" in path:
            files = []
            for f in json.loads(body)["files"]:
                sample = base64.b64decode(f["sample"])
                mode = "lfs" if f["size"] > 10_000_000 or b"\0" in sample else "regular"
                self.upload_modes[f["path"]] = mode
                files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": None})
            return 200, {"files": files}
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            req = json.loads(body)
            assert "basic" in req["transfers"]
            repo = path[1:-len(".git/info/lfs/objects/batch")]
            objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                "upload": {"href": f"{self.url}/lfs-store/{o['oid']}"},
                "verify": {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify", "header": {}}}}
                for o in req["objects"]]
            return 200, {"transfer": "basic", "objects": objects}
        if method == "PUT" and path.startswith("/lfs-store/"):
            self.lfs[path.rsplit("/", 1)[1]] = body
            return 200, {}
        if method == "POST" and path.endswith(".git/info/lfs/objects/verify"):
            req = json.loads(body)
            data = self.lfs.get(req["oid"])
            ok = data is not None and hashlib.sha256(data).hexdigest() == req["oid"] and len(data) == req["size"]
            return (200, {}) if ok else (422, {"error": "object does not match"})
        if method == "POST" and "/commit/" in path:
            lines = [json.loads(x) for x in body.splitlines() if x.strip()]
            files = {}
            for item in lines[1:]:
                v = item["value"]
                if item["key"] == "file":
                    files[v["path"]] = ("regular", base64.b64decode(v["content"]))
                elif item["key"] == "lfsFile":
                    if v["oid"] not in self.lfs:
                        return 422, {"error": f"LFS object {v['oid']} was never uploaded"}
                    files[v["path"]] = ("lfs", self.lfs[v["oid"]])
            self.commits.append({"path": path, "header": lines[0]["value"], "files": files})
            oid = hashlib.sha1(body).hexdigest()
            repo = path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        return 404, {"error": f"no route {method} {path}"}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The local Hub, huggingface_hub pointed at it (HF_ENDPOINT), Xet disabled (HF_HUB_DISABLE_XET: the legacy
    LFS path), and no token file from the machine."""
    import huggingface_hub.constants as C

    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(C, "ENDPOINT", server.url)  # constants are read at import: set both
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(C, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        # huggingface_hub fetches an anonymous registry for its user agent once a day: keep its cache here
        monkeypatch.setattr(C, "AGENT_HARNESSES_PATH", str(tmp_path / "agent-harnesses.json"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        yield server


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny real export: checkpoint + GGUF, plus a > 10 MB file, and leftovers that must never be uploaded."""
    from formats import gguf as G
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare
    from tiny_models import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("push")
    model = prepare(tiny_model("llama"), QATConfig(bits=2))
    recipe = {"method": "rtn", "base_model": "test-org/tiny-llama"}
    ckpt = QATCheckpoint.from_qat_model(model, tiny_tokenizer(), recipe=recipe).save(root / "checkpoint")
    G.export_gguf(ckpt, root / "tiny-2bit.gguf", G.GGUFOptions(license="mit", progress=False))
    (root / "extra").mkdir()
    (root / "extra" / "large.dat").write_bytes(os.urandom(LARGE))
    (root / "notes.txt").write_text("plain text: a regular git blob\n")
    (root / ".tiny-2bit.gguf.partial-x1y2").write_bytes(b"interrupted export")
    (root / "scratch.tmp").write_text("temp")
    (root / "checkpoint.train").mkdir()
    (root / "checkpoint.train" / "trainer_state.pt").write_bytes(b"\0state")
    (root / ".cache").mkdir()
    (root / ".cache" / "x").write_text("cache")
    return root


NEVER_UPLOADED = {".tiny-2bit.gguf.partial-x1y2", "scratch.tmp", "checkpoint.train/trainer_state.pt", ".cache/x"}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _token_free(folder: Path, *texts: str) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    for text in texts:
        assert TOKEN not in text


def test_push_end_to_end(fake_hub, export_dir, tmp_path, monkeypatch, capsys, caplog):
    from paretoq_export import cli

    folder = _copy(export_dir, tmp_path / "out")
    assert not (folder / "README.md").exists()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with caplog.at_level(logging.DEBUG):
        assert cli.main(["push", str(folder), "--repo-id", "someone/tiny-2bit", "--private"]) == 0
    out, err = capsys.readouterr()

    # the repo was created, private
    assert fake_hub.repos["someone/tiny-2bit"]["visibility"] == "private" or \
        fake_hub.repos["someone/tiny-2bit"].get("private") is True
    # one commit holding every file of the folder, byte for byte, and nothing that must stay local
    assert len(fake_hub.commits) == 1
    received = fake_hub.commits[0]["files"]
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    expected = {k: v for k, v in local.items() if k not in NEVER_UPLOADED}
    assert set(received) == set(expected)
    for path, (_, data) in received.items():
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(expected[path]).hexdigest(), path
    # the large file went through the LFS batch API and a basic-transfer PUT, the text files inline
    assert received["extra/large.dat"][0] == "lfs" and len(received["extra/large.dat"][1]) == LARGE
    puts = [r for r in fake_hub.requests if r["method"] == "PUT"]
    assert hashlib.sha256(expected["extra/large.dat"]).hexdigest() in {r["path"].rsplit("/", 1)[1] for r in puts}
    assert received["tiny-2bit.gguf"][0] == "lfs" and received["notes.txt"][0] == "regular"
    # the generated model card is in the folder and in the commit
    assert received["README.md"] == ("regular", (folder / "README.md").read_bytes())
    assert b"base_model: test-org/tiny-llama" in received["README.md"][1]
    assert "wrote" in out and "README.md" in out and "commit:" in out

    # the token went to the Hub API in the Authorization header (not to the storage PUT), and nowhere else
    api_calls = [r for r in fake_hub.requests if (r["path"].startswith("/api/") or ".git/" in r["path"])
                 and r["path"] != "/api/agent-harnesses"]  # the client's anonymous user-agent registry
    unauthenticated = [(r["method"], r["path"], sorted(r["headers"])) for r in api_calls
                       if r["headers"].get("authorization") != f"Bearer {TOKEN}"]
    assert api_calls and not unauthenticated
    assert all("authorization" not in r["headers"] for r in puts)
    _token_free(folder, out, err, "\n".join(r.getMessage() for r in caplog.records), caplog.text)

    # the dry-run prediction of each file's upload mode is what the Hub decided
    plan = H.plan_upload(folder)
    assert {f.path_in_repo: f.mode for f in plan.files} == {p: m for p, (m, _) in received.items()}


def test_dry_run_needs_no_token_and_sends_nothing(fake_hub, export_dir, tmp_path, capsys):
    from paretoq_export import cli

    folder = _copy(export_dir, tmp_path / "out")
    assert cli.main(["push", str(folder), "--repo-id", "someone/tiny-2bit", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert fake_hub.requests == []
    assert not (folder / "README.md").exists()  # a dry run writes nothing
    lines = out.splitlines()
    assert lines[0].startswith("dry run: would upload")
    listed = {ln.split()[-1] if "(generated" not in ln else ln.split()[-4]: ln for ln in lines if ln.startswith("  ")}
    assert listed["extra/large.dat"].split()[0] == "LFS"
    assert listed["notes.txt"].split()[0] == "regular"
    assert "(generated model card)" in listed["README.md"]
    assert "checkpoint/model.safetensors" in listed and "tiny-2bit.gguf" in listed
    for name in NEVER_UPLOADED:
        assert name not in listed
    assert "not uploaded (4" in out


def test_no_token_is_one_clear_line(fake_hub, export_dir, tmp_path, capsys):
    from paretoq_export import cli

    folder = _copy(export_dir, tmp_path / "out")
    assert cli.main(["push", str(folder), "--repo-id", "someone/tiny-2bit"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no Hugging Face token")
    assert "hf auth login" in err and "HF_TOKEN" in err
    assert fake_hub.requests == [] and not (folder / "README.md").exists()
    assert cli.main(["push", str(folder), "--repo-id", "not a repo id", "--dry-run"]) == 2
    assert "USER/NAME" in capsys.readouterr().err


def test_rejected_token_is_one_line_without_the_token(fake_hub, export_dir, tmp_path, monkeypatch, capsys):
    from paretoq_export import cli

    folder = _copy(export_dir, tmp_path / "out")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(fake_hub, "route", lambda *a: (401, {"error": "Invalid credentials in Authorization header"}))
    assert cli.main(["push", str(folder), "--repo-id", "someone/tiny-2bit"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: the Hub refused the push") and "write access" in err and err.count("\n") == 1
    _token_free(folder, out, err)


def test_push_to_a_branch_with_an_existing_card(fake_hub, export_dir, tmp_path, monkeypatch, capsys):
    """--revision: the branch is created and the commit goes there; a README.md already in the folder is kept as is."""
    from paretoq_export import cli

    folder = _copy(export_dir, tmp_path / "out")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# hand-written card\n")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(["push", str(folder), "--repo-id", "someone/tiny-2bit", "--revision", "dev",
                     "--commit-message", "first upload"]) == 0
    out, err = capsys.readouterr()
    assert fake_hub.branches == [("someone/tiny-2bit", "dev")]
    commit = fake_hub.commits[0]
    assert commit["path"].endswith("/commit/dev") and commit["header"]["summary"] == "first upload"
    assert commit["files"]["README.md"][1] == b"---\nlicense: mit\n---\n\n# hand-written card\n"
    assert "wrote" not in out  # no card generated
    _token_free(folder, out, err)
