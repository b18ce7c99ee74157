"""The server, end to end: the official openai client against uvicorn on a loopback port.

Covers the API (models, completions, chat, streaming, sampling, stop), per-request experts (masking
equals physical removal, also inside one mixed batch), attribution, owner switches and their
authorisation, admin model changes with requests in flight, the audit log, the ledger (write-ahead under
kill -9, report), bad requests, PostgreSQL (when a server can be started) and the owner page in Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from flexmoe.cli import app as cli_app
from flexmoe.compose import MODEL_KIND, ComposeSettings, Provenance, compose, remove
from flexmoe.errors import FlexmoeError
from flexmoe.expert.train import train_expert
from flexmoe.signing import ALLOW_UNSIGNED, SIGNATURE, generate_keys, load_private_key, sign_dir

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

NAME = "fed"
PROMPTS = ["def add(a, b):", "The court held that", "x = 1\ny =", "In the beginning"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fed(tiny_anchor, demo_data, tmp_path_factory) -> dict:
    """A tiny composed model (public + code + legal, top-2 of 3), the same without legal, and packages.
    The packages are unsigned; the models are signed by the maintainer (served with no option)."""
    root = tmp_path_factory.mktemp("serve")
    for d in ("code", "legal"):
        train_expert(tiny_anchor, [demo_data / d], d, root / "pkg" / d, steps=3, quiet=True)
    key, pub, _ = generate_keys(root / "keys" / "maintainer")
    prov = Provenance(trust=ALLOW_UNSIGNED, sign_key=load_private_key(key))
    compose(
        tiny_anchor,
        [root / "pkg" / d for d in ("code", "legal")],
        root / NAME,
        ComposeSettings(top_k=2),
        provenance=prov,
    )
    remove(root / NAME, "legal", root / "removed", provenance=prov)
    (root / NAME / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # only the served model has one
    sign_dir(root / NAME, prov.sign_key, MODEL_KIND)  # again: the template is part of the model
    return {
        "root": root,
        "model": root / NAME,
        "removed": root / "removed",
        "pkg": root / "pkg",
        "maintainer": pub,
    }


class Server:
    """uvicorn running the app in a thread on a free loopback port."""

    def __init__(self, settings):
        from flexmoe.serve.app import create_app

        self.app = create_app(settings)
        self.state = self.app.state.flexmoe
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def keys(fed) -> dict:
    owners = fed["root"] / "owners.json"
    r = CliRunner()
    out = {}
    for owner, expert in (("acme", "legal"), ("coders", "code")):
        res = r.invoke(cli_app, ["owners", "add", owner, "--expert", expert, "--owners", str(owners)])
        assert res.exit_code == 0, res.output
        out[owner] = res.output.strip().splitlines()[-1]
    res = r.invoke(cli_app, ["owners", "admin-key", "--owners", str(owners)])
    out["admin"] = res.output.strip().splitlines()[-1]
    raw = owners.read_text()
    # only hashes stored (the secret is everything after the second underscore: it may hold "_" itself)
    assert all(k not in raw and k.split("_", 2)[2] not in raw for k in out.values())
    assert json.loads(raw)["owners"]["acme"]["key_hash"]["kdf"] == "scrypt"
    return {**out, "file": owners}


@pytest.fixture(scope="module")
def server(fed, keys):
    from flexmoe.serve.app import Settings

    s = Server(
        Settings(
            fed["model"],
            name=NAME,
            owners=keys["file"],
            db=f"sqlite:///{fed['root'] / 'ledger.sqlite'}",
            audit_log=fed["root"] / "audit.jsonl",
            workdir=fed["root"] / "versions",
            allow_unsigned=True,  # the fixture's packages are unsigned (admin add/update checks them)
        )
    )
    yield s
    s.stop()


def reference(model_dir: Path, prompt: str, n: int) -> str:
    """Greedy continuation from stock HF generate on a model directory (no flexmoe runtime)."""
    from transformers import AutoModelForCausalLM

    from flexmoe.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def expert_changes_logits(fed: dict, prompts: list[str]) -> bool:
    """Whether removing legal changes the stock model's next-token logits (tiny experts trained for a few
    steps may leave greedy tokens unchanged; the logits still move)."""
    from transformers import AutoModelForCausalLM

    from flexmoe.tokenizer import load_tokenizer

    tok = load_tokenizer(fed["model"])
    a, b = (AutoModelForCausalLM.from_pretrained(str(fed[k])).eval() for k in ("model", "removed"))
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
            if not torch.allclose(a(ids).logits, b(ids).logits, atol=1e-4):
                return True
    return False


def greedy(client, prompt: str, model: str = NAME, n: int = 8, **extra):
    """Greedy, always ``n`` tokens (``ignore_eos``, like the reference)."""
    return client.completions.create(
        model=model, prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True, **extra}
    )


# ----------------------------------------------------------------------------------------------------
# API


def test_models_lists_the_model_and_its_expert_variants(server):
    ids = [m.id for m in server.client().models.list()]
    assert ids[0] == NAME and f"{NAME}:-legal" in ids and f"{NAME}:-code" in ids


def test_completion_usage_and_attribution(server):
    r = greedy(server.client(), PROMPTS[0], n=6)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    att = r.model_extra["flexmoe"]["attribution"]
    assert set(att) == {"public", "code", "legal"} and abs(sum(att.values()) - 1) < 1e-6
    assert all(v >= 0 for v in att.values())


def test_greedy_equals_stock_transformers_and_exclusion_equals_removal(server, fed):
    """Full model = stock HF generate on the export; excluding legal (body or model id) = the model
    that `flexmoe remove` wrote, token for token, also when all requests share one batch."""
    c = server.client()
    full = [reference(fed["model"], p, 8) for p in PROMPTS]
    removed = [reference(fed["removed"], p, 8) for p in PROMPTS]
    assert expert_changes_logits(fed, PROMPTS)  # so the equalities below can fail
    jobs = []
    with ThreadPoolExecutor(8) as pool:
        for p in PROMPTS:
            jobs.append(pool.submit(greedy, c, p))
            jobs.append(pool.submit(greedy, c, p, experts={"exclude": ["legal"]}))
            jobs.append(pool.submit(greedy, c, p, model=f"{NAME}:-legal"))
            jobs.append(pool.submit(greedy, c, p, experts={"include": ["code"]}))
        res = [j.result() for j in jobs]
    for i in range(len(PROMPTS)):
        a, b, m, inc = res[4 * i : 4 * i + 4]
        assert a.choices[0].text == full[i]
        assert b.choices[0].text == removed[i] == m.choices[0].text == inc.choices[0].text
        assert b.model_extra["flexmoe"]["attribution"]["legal"] == 0.0


def test_streaming_completion_and_chat(server):
    c = server.client()
    plain = greedy(c, PROMPTS[1], n=10).choices[0].text
    chunks = list(
        c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(ch.choices[0].text for ch in chunks) == plain
    last = chunks[-1]
    assert last.choices[0].finish_reason and last.usage.completion_tokens == 10
    assert set(last.model_extra["flexmoe"]["attribution"]) == {"public", "code", "legal"}
    msgs = [{"role": "user", "content": "hello"}]
    chat = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    streamed = list(
        c.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0, stream=True)
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == chat.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == chat.usage.completion_tokens == 5


def test_sse_ends_with_done(server):
    body = {"model": NAME, "prompt": "a", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_sampling_is_seeded_and_stop_truncates(server):
    c = server.client()
    kw = {"model": NAME, "prompt": PROMPTS[3], "max_tokens": 12, "temperature": 1.5, "top_p": 0.95}
    a = c.completions.create(seed=7, **kw).choices[0].text
    assert a == c.completions.create(seed=7, **kw).choices[0].text
    texts = {c.completions.create(seed=s, **kw).choices[0].text for s in range(8, 12)}
    assert len(texts | {a}) > 1  # sampling does sample
    full = greedy(c, PROMPTS[0], n=12).choices[0].text
    assert len(full) >= 5
    stop = full[3:5]
    cut = greedy(c, PROMPTS[0], n=12, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------------------------------
# Bad requests


def test_bad_requests_get_openai_errors(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        greedy(c, "x", model="nope")
    assert e.value.body["code"] == "model_not_found" if isinstance(e.value.body, dict) else True
    with pytest.raises(openai.NotFoundError):
        greedy(c, "x", experts={"exclude": ["nobody"]})
    with pytest.raises(openai.BadRequestError):
        greedy(c, "x", model=f"{NAME}:legal")
    with pytest.raises(openai.BadRequestError) as e:
        greedy(c, "word " * 5000)
    assert "context" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        greedy(c, "x", experts={"exclude": ["public", "code", "legal"]})
    with pytest.raises(openai.UnprocessableEntityError):
        c.completions.create(model=NAME, prompt="x", max_tokens=-3)
    raw = [
        httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30),
        httpx.post(server.url + "/v1/completions", json={"model": NAME}, timeout=30),
        httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": []}, timeout=30),
        httpx.post(server.url + "/v1/completions", json=[1, 2], timeout=30),
        httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "x", "experts": 5}),
    ]
    for r in raw:
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
    assert greedy(c, "still alive", n=2).usage.completion_tokens == 2


def test_chat_without_template_is_a_clear_400(fed, tmp_path):
    import asyncio

    from flexmoe.serve.app import Settings, create_app

    plain = tmp_path / "plain"
    shutil.copytree(fed["removed"], plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    app = create_app(Settings(plain, name="plain", db=f"sqlite:///{tmp_path / 'l.sqlite'}"))

    async def go():
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://t") as h:
            body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
            return await h.post("/v1/chat/completions", json=body)

    r = asyncio.run(go())
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"


# ----------------------------------------------------------------------------------------------------
# Governance


def _post(client, path):
    return client.post(path, cast_to=httpx.Response, body={})


def test_owner_switches_only_its_own_expert(server, fed, keys):
    acme = server.client(keys["acme"])
    with pytest.raises(openai.AuthenticationError):
        _post(server.client("fmk_00_wrong"), "/experts/legal/disable")
    r = httpx.post(server.url + "/v1/experts/legal/disable", timeout=30)  # no key at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.PermissionDeniedError):
        _post(acme, "/experts/code/disable")
    with pytest.raises(openai.NotFoundError):
        _post(acme, "/experts/nobody/disable")
    removed = reference(fed["removed"], PROMPTS[1], 8)
    _post(acme, "/experts/legal/disable")
    try:
        r = greedy(server.client(), PROMPTS[1])  # every request, not only the owner's
        assert r.choices[0].text == removed and r.model_extra["flexmoe"]["attribution"]["legal"] == 0
        me = acme.get("/owner/me", cast_to=httpx.Response).json()
        assert me == {"owner": "acme", "expert": "legal", "enabled": False}
    finally:
        _post(acme, "/experts/legal/enable")
    assert greedy(server.client(), PROMPTS[1]).model_extra["flexmoe"]["attribution"]["legal"] > 0


def test_admin_changes_experts_without_dropping_requests(server, fed, keys):
    admin = server.client(keys["admin"])
    with pytest.raises(openai.PermissionDeniedError):
        admin_as_owner = server.client(keys["coders"])
        admin_as_owner.delete("/admin/experts/legal", cast_to=httpx.Response)
    c = server.client()
    with ThreadPoolExecutor(2) as pool:  # a long stream is in flight while the model is swapped
        inflight = pool.submit(
            lambda: list(
                c.completions.create(model=NAME, prompt="a", max_tokens=60, temperature=0, stream=True)
            )
        )
        time.sleep(0.3)
        r = admin.delete("/admin/experts/legal", cast_to=httpx.Response).json()
        chunks = inflight.result()
    assert chunks[-1].usage.completion_tokens == 60
    assert r["experts"] == ["public", "code"]
    assert [m.id for m in c.models.list()] == [NAME, f"{NAME}:-code"]
    assert greedy(c, PROMPTS[2]).choices[0].text == reference(fed["removed"], PROMPTS[2], 8)
    r = admin.post("/admin/experts", cast_to=httpx.Response, body={"package": str(fed["pkg"] / "legal")})
    assert r.json()["experts"] == ["public", "code", "legal"]
    r = admin.post("/admin/model", cast_to=httpx.Response, body={"path": str(fed["model"])})
    assert greedy(c, PROMPTS[2]).choices[0].text == reference(fed["model"], PROMPTS[2], 8)


def test_audit_log_chains_and_detects_tampering(server, fed, keys, tmp_path):
    _post(server.client(keys["coders"]), "/experts/code/disable")
    _post(server.client(keys["coders"]), "/experts/code/enable")
    log = fed["root"] / "audit.jsonl"
    r = CliRunner().invoke(cli_app, ["audit-log", "verify", str(log)])
    assert r.exit_code == 0 and "audit log OK" in r.output, r.output
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["action"] for e in entries[-2:]] == ["disable", "enable"] and entries[-1]["actor"] == "coders"
    bad = tmp_path / "bad.jsonl"
    lines = log.read_text().splitlines()
    lines[0] = lines[0].replace('"disable"', '"enable"', 1)
    bad.write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(cli_app, ["audit-log", "verify", str(bad)])
    assert r.exit_code != 0 and "FAILED" in str(r.exception or r.output)
    bad.write_text("\n".join(log.read_text().splitlines()[1:]) + "\n")  # first entry dropped
    assert CliRunner().invoke(cli_app, ["audit-log", "verify", str(bad)]).exit_code != 0


def test_admin_add_refuses_an_unsigned_package_unless_allowed(fed, keys, tmp_path):
    """The admin's add checks the package like `flexmoe add`: unsigned -> 400 naming the problem."""
    import asyncio

    from flexmoe.serve.app import Settings, create_app

    app = create_app(
        Settings(
            fed["removed"],
            name="m",
            owners=keys["file"],
            db=f"sqlite:///{tmp_path / 'l.sqlite'}",
            audit_log=tmp_path / "a.jsonl",
            workdir=tmp_path / "versions",
        )
    )

    async def go():
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://t") as h:
            auth = {"Authorization": f"Bearer {keys['admin']}"}
            return await h.post(
                "/v1/admin/experts", json={"package": str(fed["pkg"] / "legal")}, headers=auth
            )

    r = asyncio.run(go())
    assert r.status_code == 400 and "not signed" in r.json()["error"]["message"], r.text
    assert not (tmp_path / "versions").exists() or not any((tmp_path / "versions").iterdir())


def test_served_and_swapped_models_are_verified(fed, keys, tmp_path):
    """The model served, and one the admin swaps in, are verified as `flexmoe generate` loads them:
    unsigned refused unless allowed, --trust pins the maintainer's key. The versions the server
    writes itself (unsigned: it holds no key) are served."""
    from flexmoe.serve.app import Settings, create_app

    unsigned = shutil.copytree(fed["removed"], tmp_path / "unsigned")
    (unsigned / SIGNATURE).unlink()
    common = dict(
        name=NAME,
        owners=keys["file"],
        db=f"sqlite:///{tmp_path / 'l.sqlite'}",
        audit_log=tmp_path / "a.jsonl",
        workdir=tmp_path / "versions",
    )
    with pytest.raises(FlexmoeError, match="not signed.*--allow-unsigned"):
        create_app(Settings(unsigned, **common))
    other = generate_keys(tmp_path / "other")[1]
    with pytest.raises(FlexmoeError, match="not among the --trust keys"):
        create_app(Settings(fed["removed"], trust=[other], **common))
    assert create_app(Settings(unsigned, allow_unsigned=True, **common)).state.flexmoe.composed.names
    server = Server(Settings(fed["model"], trust=[fed["maintainer"]], **common))
    try:
        auth = {"Authorization": f"Bearer {keys['admin']}"}
        with httpx.Client(base_url=server.url + "/v1", headers=auth, timeout=120) as admin:
            r = admin.post("/admin/model", json={"path": str(unsigned)})
            assert r.status_code == 400 and "not signed" in r.json()["error"]["message"], r.text
            assert server.state.model_dir == fed["model"]
            r = admin.delete("/admin/experts/legal")
            assert r.status_code == 200 and r.json()["experts"] == ["public", "code"], r.text
        assert not (Path(r.json()["model"]) / SIGNATURE).exists()
        assert greedy(server.client(), PROMPTS[2]).choices[0].text == reference(fed["removed"], PROMPTS[2], 8)
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------
# Ledger


def test_ledger_has_every_request_and_reports(server, fed, tmp_path):
    before = server.state.ledger.count()
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda p: greedy(server.client(), p, n=3), PROMPTS * 3))
    assert server.state.ledger.count() == before + 12
    db = f"sqlite:///{fed['root'] / 'ledger.sqlite'}"
    r = CliRunner().invoke(
        cli_app, ["ledger", "report", "--db", db, "--csv", "--plot", str(tmp_path / "u.png")]
    )
    assert r.exit_code == 0, r.output
    rows = [x.split(",") for x in r.output.splitlines() if x and "," in x]
    assert rows[0] == ["day", "owner", "expert", "requests", "tokens"]
    owners = {x[1] for x in rows[1:]}
    assert {"acme", "coders"} <= owners
    assert (tmp_path / "u.png").stat().st_size > 1000
    text = CliRunner().invoke(cli_app, ["ledger", "report", "--db", db, "--since", "1d"]).output
    assert "acme" in text and "totals" in text


def test_a_client_that_disconnects_mid_stream_is_still_billed(server):
    """The tokens made before a streaming client went away used the owners' experts: the request is
    in the ledger (finish reason 'cancelled'), and its row of the batch was freed early."""
    from sqlalchemy import select

    from flexmoe.serve.ledger import requests

    before = server.state.ledger.count()
    body = {"model": NAME, "prompt": "The court", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # one token received: hang up
    for _ in range(300):
        if server.state.ledger.count() == before + 1:
            break
        time.sleep(0.1)
    assert server.state.ledger.count() == before + 1
    with server.state.ledger.engine.connect() as conn:
        last = conn.execute(select(requests).order_by(requests.c.created.desc()).limit(1)).one()
    assert last.finish_reason == "cancelled" and 0 < last.completion_tokens < 400


def test_ledger_survives_kill_9(fed, tmp_path):
    port = free_port()
    db = tmp_path / "ledger.sqlite"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [
        sys.executable,
        "-m",
        "flexmoe",
        "serve",
        str(fed["model"]),
        "--port",
        str(port),
        "--name",
        NAME,
        "--db",
        f"sqlite:///{db}",
        "--audit-log",
        str(tmp_path / "a.jsonl"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        for _ in range(600):
            try:
                c.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(lambda p: greedy(c, p, n=4), PROMPTS * 2))
        # One more request in flight when the server dies: it may or may not be in the ledger.
        pool2 = ThreadPoolExecutor(1)
        pool2.submit(lambda: greedy(c, "late", n=50))
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    from flexmoe.serve.ledger import Ledger

    n = Ledger(f"sqlite:///{db}").count()
    assert len(done) == 8 and n in (8, 9)


# ----------------------------------------------------------------------------------------------------
# PostgreSQL, when a throwaway server can be started here


@pytest.fixture(scope="module")
def postgres_url():
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = shutil.which("initdb") or (found[-1] if found else None)
    if initdb is None:
        pytest.skip("PostgreSQL NOT TESTED: no initdb (apt-get install postgresql, or `make system-deps`)")
    bindir = Path(initdb).resolve().parent
    # Not under pytest's tmp dir: that is private to root, and the server runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="flexmoe-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    pre: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: use the package's system user
        pre = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    run = lambda *a: subprocess.run([*pre, *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run(str(bindir / "initdb"), "-D", str(data), "-U", "flexmoe", "--auth=trust")
    if r.returncode != 0:
        pytest.skip(f"PostgreSQL NOT TESTED: initdb failed: {r.stderr[-300:]}")
    opts = f"-p {port} -k {sock} -c listen_addresses=''"
    r = run(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-w", "-l", str(root / "log"), "start")
    if r.returncode != 0:
        pytest.skip(f"PostgreSQL NOT TESTED: pg_ctl start failed: {r.stderr[-300:]}")
    subprocess.run(
        [*pre, str(bindir / "createdb"), "-h", str(sock), "-p", str(port), "-U", "flexmoe", "ledger"]
    )
    yield f"postgresql+psycopg://flexmoe@/ledger?host={sock}&port={port}"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    shutil.rmtree(root, ignore_errors=True)


def test_ledger_on_postgresql(postgres_url):
    from flexmoe.serve.ledger import Ledger, migrate

    led = Ledger(postgres_url)
    assert migrate(led.engine) == 1  # idempotent: already at the newest version
    for _ in range(3):
        led.record(
            NAME,
            "text_completion",
            5,
            4,
            "length",
            {"public": 0.5, "legal": 0.5},
            lambda e: "acme" if e == "legal" else None,
        )
    assert led.count() == 3
    rows = led.daily(expert="legal")
    assert rows and rows[0]["owner"] == "acme" and rows[0]["requests"] == 3 and rows[0]["tokens"] == 6.0


# ----------------------------------------------------------------------------------------------------
# Owner page in a real browser


def test_owner_page_in_headless_chromium(server, keys):
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("OWNER PAGE NOT TESTED IN A BROWSER: /usr/bin/chromium missing (`make system-deps`)")
    sync_api = pytest.importorskip("playwright.sync_api")
    greedy(server.client(), PROMPTS[1], n=3)  # some usage to chart
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        try:
            page = browser.new_page()
            page.goto(server.url + "/owner")
            page.fill("#key", "fmk_00_wrong")
            page.click("#login-btn")
            page.wait_for_selector("#error:has-text('Login failed')")
            page.fill("#key", keys["acme"])
            page.click("#login-btn")
            page.wait_for_selector("#status:has-text('on')")
            assert page.inner_text("#expert") == "legal"
            assert page.locator("#usage-chart rect.bar").count() >= 1
            page.click("#disable")
            page.wait_for_selector("#status:has-text('off')")
            assert server.state.registry.disabled == {"legal"}
            page.click("#enable")
            page.wait_for_selector("#status:has-text('on')")
            assert server.state.registry.disabled == set()
        finally:
            browser.close()


def test_cache_keyword_follows_the_installed_transformers():
    """transformers renamed ``past_key_values`` to ``cache``; a cache passed under the wrong name is
    swallowed by ``**kwargs`` and batches then decode without context (seen on a GPU box with 5.17)."""
    from flexmoe.anchor import cache_argument

    class Old:
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class New:
        def forward(self, input_ids, cache=None, **kwargs): ...

    assert cache_argument(Old()) == "past_key_values"
    assert cache_argument(New()) == "cache"


def test_sequence_routed_server_equals_runtime_generate(fed, tmp_path):
    """``serve --sequence-routing``: each request's prompt picks its experts at prefill and keeps them
    while the batch is decoded, so the server's greedy tokens equal flexmoe's runtime ``generate`` with
    sequence routing on each prompt alone, also when the requests share one left-padded batch."""
    from flexmoe.runtime import from_pretrained
    from flexmoe.sequence_routing import SequenceRouting
    from flexmoe.serve.app import Settings

    class Seen(SequenceRouting):
        """The prefill choices the reference made, to check they are not all the same."""

        choices: list = []

        def mask_for_call(self, *a):
            out = super().mask_for_call(*a)
            if a[3] is not None and out is not None and out.dim() == 3:
                self.choices.append(out[0, -1].tolist())
            return out

    ref = from_pretrained(fed["model"], trust=ALLOW_UNSIGNED, sequence_routing=Seen(confidence=0.0))
    tok = ref.tokenizer
    want = []
    for p in PROMPTS:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        out = ref.model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        want.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert len({tuple(c) for c in Seen.choices}) > 1  # the prompts choose differently
    s = Server(
        Settings(
            fed["model"],
            name=NAME,
            db=f"sqlite:///{tmp_path / 'ledger.sqlite'}",
            audit_log=tmp_path / "audit.jsonl",
            allow_unsigned=True,
            sequence_routing=True,
        )
    )
    try:
        s.state.composed.sequence.confidence = 0.0  # the same settings as the reference
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(lambda p: greedy(s.client(), p).choices[0].text, PROMPTS))
    finally:
        s.stop()
    assert got == want
