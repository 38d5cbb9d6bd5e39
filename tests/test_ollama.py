"""The ollama publish kind against a real HTTP server in the test that speaks Ollama's blob, create and copy API."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from datetime import datetime, timedelta, timezone

import pytest

from fake_http import FakeServer, JsonHandler
from lorad import config, release
from lorad.buffer.store import Buffer
from lorad.release.hooks import GgufHook, OllamaHook, hooks_from_settings, publish
from lorad.release.registry import Registry

T0 = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)


def _tagged(name: str) -> str:
    return name if ":" in name else name + ":latest"


def listed(name: str) -> dict:
    """A model as Ollama's GET /api/tags lists it (about 470 bytes each)."""
    return {
        "name": name,
        "model": name,
        "modified_at": "2026-12-01T03:00:00.123456789+00:00",
        "size": 145000000,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "134.52M",
            "quantization_level": "Q8_0",
        },
    }


class FakeOllama(FakeServer):
    """Ollama's /api/blobs, /api/create, /api/copy and /api/version as its API docs describe them.

    ``fail`` maps a path prefix to how many 500s to answer before behaving. ``version`` is what
    GET /api/version says (None: 404). ``refuses_adapters`` makes a create with ``adapters``
    fail with a 400, as an Ollama that no longer creates models with adapters might (what 0.34.1
    answers is not known here: its CLI refuses ADAPTER before sending).
    """

    def __init__(self, library=("smollm2:135m",), version: str | None = "0.34.0", refuses_adapters=False):
        self.version, self.refuses_adapters = version, refuses_adapters
        self.blobs: dict[str, bytes] = {}
        self.models: dict[str, dict] = {_tagged(m): {"from": "library"} for m in library}
        self.requests: list[tuple[str, str]] = []
        self.fail: dict[str, int] = {}
        self.tags: str | None = None  # an /api/tags reply to give instead of the models
        fake = self

        class Handler(JsonHandler):
            def _failing(self):
                fake.requests.append((self.command, self.path))
                for prefix, left in fake.fail.items():
                    if self.path.startswith(prefix) and left > 0:
                        fake.fail[prefix] = left - 1
                        self.reply(500, {"error": "something went wrong"})
                        return True
                return False

            def do_GET(self):
                if self._failing():
                    return
                if self.path == "/api/tags":
                    if fake.tags is not None:
                        return self.reply(200, fake.tags)
                    return self.reply(200, {"models": [listed(n) for n in fake.models]})
                if self.path == "/api/version" and fake.version is not None:
                    return self.reply(200, {"version": fake.version})
                return self.reply(404, {"error": "not found"})

            def do_DELETE(self):
                body = json.loads(self.read_body())
                if self._failing():
                    return
                if self.path != "/api/delete":
                    return self.reply(404, {"error": "not found"})
                if fake.models.pop(_tagged(body["model"]), None) is None:
                    return self.reply(404, {"error": f"model '{body['model']}' not found"})
                return self.reply(200, None)

            def do_HEAD(self):
                if self._failing():
                    return
                digest = self.path.removeprefix("/api/blobs/")
                self.send_response(200 if digest in fake.blobs else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                data = self.read_body()
                if self._failing():
                    return
                if self.path.startswith("/api/blobs/"):
                    digest = self.path.removeprefix("/api/blobs/")
                    if digest != "sha256:" + hashlib.sha256(data).hexdigest():
                        return self.reply(400, {"error": "digest mismatch"})
                    fake.blobs[digest] = data
                    return self.reply(201, None)
                body = json.loads(data)
                if self.path == "/api/create":
                    return self.create(body)
                if self.path == "/api/copy":
                    if _tagged(body["source"]) not in fake.models:
                        return self.reply(404, {"error": f"model '{body['source']}' not found"})
                    fake.models[_tagged(body["destination"])] = fake.models[_tagged(body["source"])]
                    return self.reply(200, None)
                return self.reply(404, {"error": "not found"})

            def create(self, body):
                if not body.get("model"):
                    return self.reply(400, {"error": "model is required"})
                if body.get("adapters") and fake.refuses_adapters:
                    return self.reply(400, {"error": "creating models with adapters is not supported"})
                for field in ("files", "adapters"):
                    for name, digest in (body.get(field) or {}).items():
                        if digest not in fake.blobs:
                            return self.reply(400, {"error": f"{name}: blob {digest} not found"})
                if "from" in body and _tagged(body["from"]) not in fake.models:
                    return self.reply(400, {"error": f"pull model manifest: model {body['from']} not found"})
                if "from" not in body and not body.get("files"):
                    return self.reply(400, {"error": "neither 'from' nor 'files' was specified"})
                fake.models[_tagged(body["model"])] = {k: body[k] for k in ("from", "files", "adapters") if k in body}
                if body.get("stream", True):  # a stream of JSON objects, as Ollama answers by default
                    return self.reply(
                        200, "\n".join(json.dumps({"status": s}) for s in ("writing manifest", "success"))
                    )
                return self.reply(200, {"status": "success"})

        super().__init__(Handler)

    def posts(self, prefix: str) -> int:
        return sum(1 for m, p in self.requests if m == "POST" and p.startswith(prefix))


def closed_port_url() -> str:
    """A loopback URL nothing listens on (the server is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_versions(root, n=2, gguf=True, start=T0, merged=False, record=None) -> Registry:
    """``n`` versions with adapter.gguf (``gguf``) and merged.gguf (``merged``), lorad.json
    holding ``record`` besides the verdict."""
    reg = Registry(root)
    for i in range(1, n + 1):
        d = root.parent / f"job{i}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(bytes([i]) * 16)
        if gguf:
            (d / "adapter.gguf").write_bytes(b"GGUF" + bytes([i]) * 32)
            (d / "Modelfile").write_text("FROM /base.gguf\nADAPTER ./adapter.gguf\n")
        if merged:
            (d / "merged.gguf").write_bytes(b"GGUF merged" + bytes([i]) * 64)
        extra = record or {}
        reg.create(d, {"verdict": {"promote": True, "reasons": []}} | extra, now=start + timedelta(minutes=i))
    return reg


@pytest.fixture
def base_gguf(tmp_path):
    path = tmp_path / "base.gguf"
    path.write_bytes(b"GGUF base weights" * 100)
    return path


def test_creates_the_versioned_model_from_uploaded_blobs_and_moves_latest(tmp_path, base_gguf):
    reg = make_versions(tmp_path / "adapters")
    a, b = reg.names()
    with FakeOllama() as server:
        hook = OllamaHook(server.url, str(base_gguf), retries=0)
        assert publish(reg, reg.promote(a), [hook]).ok
        adapter_a = digest((reg.root / a / "adapter.gguf").read_bytes())
        assert server.models[f"lorad-{a}:latest"] == {
            "files": {"base.gguf": digest(base_gguf.read_bytes())},
            "adapters": {"adapter.gguf": adapter_a},
        }
        assert server.models["lorad:latest"] == server.models[f"lorad-{a}:latest"]
        report = publish(reg, reg.promote(b), [hook])
        assert report.ok and f"lorad:latest -> lorad-{b}" in report.results[0].detail
        assert server.models["lorad:latest"]["adapters"]["adapter.gguf"] != adapter_a
        # the base blob is uploaded once: the second time HEAD finds it
        assert server.posts(f"/api/blobs/{digest(base_gguf.read_bytes())}") == 1
        assert publish(reg, reg.rollback(), [hook]).ok
        assert server.models["lorad:latest"]["adapters"] == {"adapter.gguf": adapter_a}


def test_models_of_pruned_versions_are_deleted_at_the_next_publish_and_nothing_else(tmp_path, base_gguf):
    reg = make_versions(tmp_path / "adapters", n=3)
    a, b, c = reg.names()
    with FakeOllama() as server:
        server.models["lorad-experiment:latest"] = {"from": "library"}  # a user's own model of the prefix
        hook = OllamaHook(server.url, str(base_gguf), retries=0)
        for name in (a, b, c):
            assert publish(reg, reg.promote(name), [hook]).ok
        for p in (reg.root / a, *(reg.root / a).rglob("*")):
            p.chmod(0o755)
        shutil.rmtree(reg.root / a)  # what Registry.prune does to a version it no longer retains
        report = publish(reg, reg.rollback(), [hook])
        assert report.ok and f"deleted lorad-{a}:latest (pruned versions)" in report.results[0].detail
        assert set(server.models) == {
            "smollm2:135m",
            "lorad-experiment:latest",
            f"lorad-{b}:latest",
            f"lorad-{c}:latest",
            "lorad:latest",
        }
        # a failing listing is reported, and the publish still counts: the alias serves
        server.fail["/api/tags"] = 1
        report = publish(reg, reg.promote(c), [hook])
        assert (
            report.ok
            and "deleting the models of pruned versions failed: GET /api/tags: HTTP 500" in report.results[0].detail
        )
        assert server.models["lorad:latest"] == server.models[f"lorad-{c}:latest"]


def test_an_ollama_model_name_as_base_is_created_from(tmp_path):
    reg = make_versions(tmp_path / "adapters", n=1)
    with FakeOllama() as server:
        report = publish(reg, reg.promote(reg.names()[0]), [OllamaHook(server.url, "smollm2:135m", "me", retries=0)])
        assert report.ok
        assert server.models[f"me-{reg.names()[0]}:latest"]["from"] == "smollm2:135m"
        # an unknown base is a 4xx: final, no retries
        waits = []
        hook = OllamaHook(server.url, "nosuch:1b", "me", retries=3, sleep=waits.append)
        result = hook.run(_change(reg), reg.root)
        assert not result.ok and "HTTP 400" in result.detail and "nosuch:1b" in result.detail and waits == []


def _change(reg):
    from lorad.release.registry import Change

    name = reg.names()[0]
    return Change("promoted", name, None, None, (None, None))


def test_server_errors_are_retried_with_backoff(tmp_path, base_gguf):
    reg = make_versions(tmp_path / "adapters", n=1)
    waits = []
    with FakeOllama() as server:
        server.fail = {"/api/create": 2, "/api/copy": 1}
        hook = OllamaHook(server.url, str(base_gguf), retries=3, backoff=0.5, sleep=waits.append)
        assert publish(reg, reg.promote(reg.names()[0]), [hook]).ok
    assert waits == [0.5, 1.0, 0.5]


def test_server_down_fails_the_hook_after_its_retries_and_is_audited(tmp_path, base_gguf):
    reg = make_versions(tmp_path / "adapters", n=1)
    buffer = Buffer(":memory:")
    waits = []
    hook = OllamaHook(closed_port_url(), str(base_gguf), retries=2, backoff=0.1, sleep=waits.append)
    report = publish(reg, reg.promote(reg.names()[0]), [hook], audit=buffer.record_event)
    assert not report.ok and report.reverted is None  # not required: the pointer stays
    assert "after 3 attempts" in report.results[0].detail and waits == [0.1, 0.2]
    assert reg.current() == reg.names()[0]
    assert [e["detail"]["hook"] for e in buffer.events("publish_failed")] == [hook.name]


def test_required_ollama_hook_that_keeps_failing_reverts_the_promotion_through_release(tmp_path, base_gguf):
    """``lorad promote`` with a required ollama hook on a server answering 500: the pointer goes back."""
    with FakeOllama() as server:
        settings = config.loads(f"""
[daemon]
state_dir = "{tmp_path / "state"}"
[[publish]]
kind = "ollama"
url = "{server.url}"
base = "{base_gguf}"
retries = 1
backoff = 0
required = true
""")
        reg = make_versions(settings.state_dir / "adapters")
        a, b = reg.names()
        with Buffer(settings.buffer_path) as buffer:
            assert release.promote(settings, buffer, a)["publish"]["ok"]
            server.fail = {"/api/create": 2}  # both attempts of the promotion's create
            done = release.promote(settings, buffer, b)
            events = [e["event"] for e in buffer.events("adapter_change_reverted")]
        assert done["publish"]["reverted"]["version"] == a and reg.current() == a
        assert "HTTP 500" in done["publish"]["results"][0]["detail"]
        assert events == ["adapter_change_reverted"]
        # the revert ran the hook again: Ollama follows the pointer back
        assert done["publish"]["revert_results"][0]["ok"]
        assert server.models["lorad:latest"] == server.models[f"lorad-{a}:latest"]


def test_a_version_without_adapter_gguf_fails_both_kinds_with_the_reason(tmp_path, base_gguf):
    reg = make_versions(tmp_path / "adapters", n=1, gguf=False)
    with FakeOllama() as server:
        report = publish(
            reg, reg.promote(reg.names()[0]), [GgufHook(), OllamaHook(server.url, str(base_gguf), retries=0)]
        )
        assert server.requests == []
    gguf, ollama = report.results
    assert not gguf.ok and "made before a gguf or ollama publish table" in gguf.detail
    assert "lorad export-adapter" in gguf.detail
    assert not ollama.ok and "no adapter.gguf" in ollama.detail


def test_reverting_to_no_version_points_latest_at_the_bare_base(tmp_path, base_gguf):
    reg = make_versions(tmp_path / "adapters", n=1)
    with FakeOllama() as server:
        hook = OllamaHook(server.url, str(base_gguf), retries=0)
        change = reg.promote(reg.names()[0])
        assert publish(reg, change, [hook]).ok
        assert publish(reg, reg.revert(change), [hook]).ok
        assert server.models["lorad:latest"] == {"files": {"base.gguf": digest(base_gguf.read_bytes())}}


def test_hooks_are_built_from_gguf_and_ollama_tables():
    s = config.loads(
        '[training]\nbase_model = "/m/base.gguf"\n[[publish]]\nkind = "gguf"\nrequired = true\n'
        '[[publish]]\nkind = "ollama"\nurl = "http://127.0.0.1:11434"\nname_prefix = "coder"\n'
    )
    gguf, ollama = hooks_from_settings(s.publish, s.training.base_model)
    assert gguf == GgufHook(required=True)
    assert (ollama.url, ollama.base, ollama.name_prefix, ollama.required, ollama.mode) == (
        "http://127.0.0.1:11434",
        "/m/base.gguf",
        "coder",
        False,
        "adapter",
    )
    auto = config.loads(
        '[training]\nbase_model = "/m/base.gguf"\n[[publish]]\nkind = "ollama"\n'
        'url = "http://127.0.0.1:11434"\nollama_mode = "auto"\n'
    )
    assert hooks_from_settings(auto.publish, auto.training.base_model)[0].mode == "auto"


def remove_version(reg, name) -> None:
    """What Registry.prune does to a version it no longer retains."""
    for p in (reg.root / name, *(reg.root / name).rglob("*")):
        p.chmod(0o755)
    shutil.rmtree(reg.root / name)


def test_a_server_with_many_models_is_listed_whole_and_a_required_hook_keeps_the_promotion(tmp_path, base_gguf):
    """20 models make /api/tags about 10 kB: read whole (never cut at 2,000 characters), so the
    prune works and a required hook does not undo a good promotion."""
    reg = make_versions(tmp_path / "adapters", n=3)
    a, b, c = reg.names()
    with FakeOllama(library=[f"library-model-{i}:7b" for i in range(17)]) as server:
        hook = OllamaHook(server.url, str(base_gguf), retries=0, required=True)
        for name in (a, b):
            assert publish(reg, reg.promote(name), [hook]).ok
        remove_version(reg, a)
        assert len(json.dumps({"models": [listed(n) for n in server.models]})) > 3 * 2000
        report = publish(reg, reg.promote(c), [hook])
        assert report.ok and report.reverted is None, report.results[0].detail
        assert f"deleted lorad-{a}:latest (pruned versions)" in report.results[0].detail
        assert reg.current() == c and f"lorad-{a}:latest" not in server.models


@pytest.mark.parametrize(
    "tags",
    [
        '{"models": [{"name": "lorad-v',
        "[1, 2, 3]",
        '{"models": {"a": 1}}',
        '{"models": ["lorad-x", 7, null]}',
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=["cut", "a list", "models not a list", "models not objects", "deeply nested"],
)
def test_a_broken_model_listing_only_shows_in_the_detail(tmp_path, base_gguf, tags):
    """The README's promise: a failed delete of old models never fails the hook."""
    reg = make_versions(tmp_path / "adapters", n=1)
    with FakeOllama() as server:
        server.tags = tags
        report = publish(
            reg, reg.promote(reg.names()[0]), [OllamaHook(server.url, str(base_gguf), retries=0, required=True)]
        )
    [result] = report.results
    assert result.ok and report.reverted is None, result.detail
    assert "deleting the models of pruned versions failed" in result.detail
    assert server.models["lorad:latest"] == server.models[f"lorad-{reg.names()[0]}:latest"]


def test_two_registries_with_the_default_prefix_never_delete_each_others_models(tmp_path, base_gguf):
    """Two lorad daemons on one Ollama server, both ``name_prefix = "lorad"``: each prunes only the
    models of versions it made itself (its pointers.jsonl), never the other's."""
    mine = make_versions(tmp_path / "one" / "adapters", n=3)
    theirs = make_versions(tmp_path / "two" / "adapters", n=2, start=T0 + timedelta(hours=1))
    with FakeOllama() as server:
        hook = OllamaHook(server.url, str(base_gguf), retries=0)
        for name in theirs.names():
            assert publish(theirs, theirs.promote(name), [hook]).ok
        for name in mine.names()[:2]:
            assert publish(mine, mine.promote(name), [hook]).ok
        pruned = mine.names()[0]
        remove_version(mine, pruned)
        report = publish(mine, mine.promote(mine.names()[-1]), [hook])
        assert report.ok and f"deleted lorad-{pruned}:latest" in report.results[0].detail
        assert f"lorad-{pruned}:latest" not in server.models
        assert {f"lorad-{n}:latest" for n in theirs.names()} <= set(server.models), report.results[0].detail


# -- creating a version from merged.gguf (Ollama 0.34.1 creates no models with adapters) -----------


def test_merged_mode_creates_the_version_from_merged_gguf_alone(tmp_path, base_gguf):
    reg = make_versions(tmp_path / "adapters", merged=True)
    a, b = reg.names()
    with FakeOllama(version="0.34.1") as server:
        hook = OllamaHook(server.url, str(base_gguf), retries=0, mode="merged")
        report = publish(reg, reg.promote(a), [hook])
        assert report.ok and f"created lorad-{a} (from merged.gguf)" in report.results[0].detail
        merged_a = digest((reg.root / a / "merged.gguf").read_bytes())
        assert server.models[f"lorad-{a}:latest"] == {"files": {"merged.gguf": merged_a}}
        assert server.models["lorad:latest"] == server.models[f"lorad-{a}:latest"]
        assert publish(reg, reg.promote(b), [hook]).ok
        assert publish(reg, reg.rollback(), [hook]).ok
        assert server.models["lorad:latest"] == {"files": {"merged.gguf": merged_a}}
        # neither the base nor an adapter went up, and the server's version was not asked
        assert server.posts(f"/api/blobs/{digest(base_gguf.read_bytes())}") == 0
        assert not any(
            p.startswith("/api/blobs/" + digest((reg.root / a / "adapter.gguf").read_bytes()))
            for _, p in server.requests
        )
        assert ("GET", "/api/version") not in server.requests
        # a revert to no version: the alias is the bare base, as in the adapter mode
        fresh = make_versions(tmp_path / "other" / "adapters", n=1, merged=True)
        assert publish(fresh, fresh.revert(fresh.promote(fresh.names()[0])), [hook]).ok
        assert server.models["lorad:latest"] == {"files": {"base.gguf": digest(base_gguf.read_bytes())}}


@pytest.mark.parametrize(
    "version, route",
    [
        ("0.33.2", "adapter"),
        ("0.34.0", "adapter"),
        ("0.34.1", "merged"),
        ("0.34.1-rc0", "merged"),
        ("0.35.0", "merged"),
        ("1.0.0", "merged"),
        ("0.0.0", "merged"),  # a development build
        ("nightly", "merged"),
        (None, "merged"),  # no /api/version (404)
    ],
)
def test_auto_takes_the_adapter_route_only_from_a_server_known_to_be_older_than_0_34_1(
    tmp_path, base_gguf, version, route
):
    reg = make_versions(tmp_path / "adapters", n=1, merged=True)
    (name,) = reg.names()
    with FakeOllama(version=version) as server:
        report = publish(reg, reg.promote(name), [OllamaHook(server.url, str(base_gguf), retries=0, mode="auto")])
        [result] = report.results
        assert result.ok, result.detail
        assert f"Ollama {version or 'of unknown version'}: " in result.detail
        model = server.models[f"lorad-{name}:latest"]
        if route == "adapter":
            assert model == {
                "files": {"base.gguf": digest(base_gguf.read_bytes())},
                "adapters": {"adapter.gguf": digest((reg.root / name / "adapter.gguf").read_bytes())},
            }
        else:
            assert model == {"files": {"merged.gguf": digest((reg.root / name / "merged.gguf").read_bytes())}}
        assert server.requests.count(("GET", "/api/version")) == 1


def test_auto_falls_back_to_merged_gguf_when_the_server_refuses_the_adapter(tmp_path, base_gguf):
    reg = make_versions(tmp_path / "adapters", n=1, merged=True)
    (name,) = reg.names()
    waits = []
    with FakeOllama(version="0.34.0", refuses_adapters=True) as server:
        hook = OllamaHook(server.url, str(base_gguf), retries=2, sleep=waits.append, mode="auto")
        [result] = publish(reg, reg.promote(name), [hook]).results
        assert result.ok, result.detail
        assert "the adapter route was refused" in result.detail and "HTTP 400" in result.detail
        assert "from merged.gguf" in result.detail
        assert server.models[f"lorad-{name}:latest"] == {
            "files": {"merged.gguf": digest((reg.root / name / "merged.gguf").read_bytes())}
        }
        assert server.posts("/api/create") == 2 and waits == []  # a 4xx is final: no retry, then merged


def test_the_adapter_mode_refused_by_the_server_says_which_key_to_set(tmp_path, base_gguf):
    reg = make_versions(tmp_path / "adapters", n=1, merged=True)
    with FakeOllama(refuses_adapters=True) as server:
        [result] = publish(
            reg, reg.promote(reg.names()[0]), [OllamaHook(server.url, str(base_gguf), retries=0)]
        ).results
    assert not result.ok and "creating models with adapters is not supported" in result.detail
    assert 'set ollama_mode = "auto" or "merged"' in result.detail


def test_a_version_without_merged_gguf_fails_the_merged_route_with_the_reason(tmp_path, base_gguf):
    """A version made while the mode was adapter, or whose merge was refused: lorad.json says why."""
    refused = {
        "gguf": {
            "sha256": "x",
            "merged": {"refused": "base tensor blk.0.attn_q.weight (IQ2_XXS) cannot be dequantized"},
        }
    }
    made_before = make_versions(tmp_path / "one" / "adapters", n=1)
    merge_refused = make_versions(tmp_path / "two" / "adapters", n=1, record=refused)
    with FakeOllama(version="0.34.1") as server:
        for reg, why in (
            (made_before, 'it was made while no ollama table had ollama_mode = "merged" or "auto"'),
            (merge_refused, "IQ2_XXS) cannot be dequantized"),
        ):
            for mode in ("merged", "auto"):
                hook = OllamaHook(server.url, str(base_gguf), retries=0, mode=mode)
                result = hook.run(_change(reg), reg.root)
                assert not result.ok and f"{reg.names()[0]} has no merged.gguf: " in result.detail
                assert why in result.detail
        assert server.posts("/api/create") == 0


def test_auto_with_the_server_down_fails_after_its_retries_without_creating(tmp_path, base_gguf):
    reg = make_versions(tmp_path / "adapters", n=1, merged=True)
    waits = []
    hook = OllamaHook(closed_port_url(), str(base_gguf), retries=1, backoff=0.1, sleep=waits.append, mode="auto")
    [result] = publish(reg, reg.promote(reg.names()[0]), [hook]).results
    assert not result.ok and "GET /api/version" in result.detail and "after 2 attempts" in result.detail
    assert waits == [0.1]
