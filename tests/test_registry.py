"""Live registrations (issue 17, item 7): admin keys add and revoke clients at every master with the
signed `registry` operation, each master keeps them in its own database, and they hold at once (the
very next frame, open connections included) and after restarts, ombot.toml unchanged."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peewee
import pytest
import rpyc

from ombot.envelope import Peer, Refused, new_request
from ombot.keys import Identity, decode_public
from ombot import config as cfg
from ombot.errors import ConfigError
from tests.rigs import AGENT, HOST, agent_cluster, event
from tests.rigs import AGENT_CLIENTS as CLIENTS
from tests.support import Cluster

STATUS = {"spool_depth": 0, "dropped_total": 0, "sent_total": 1}


class Link:
    """One rpyc connection to one master, sealed with one key, kept open across calls."""

    def __init__(self, cluster: Cluster, master: str, client: str | None = None,
                 identity: Identity | None = None) -> None:
        self.cluster, self.master = cluster, master
        self.identity = identity or cluster.identity(client or "test")
        self.peer = Peer(self.identity, decode_public(cluster.config().masters[master].public_key))
        self.conn = rpyc.connect("127.0.0.1", cluster.ports[master], config={"allow_pickle": False})

    def call(self, op: str, args: dict[str, Any], requester: str = "cli:test", origin: str = "cli") -> dict[str, Any]:
        """One request on this connection; the master's result, or Refused."""
        request = new_request(op, self.master, requester, origin, args)
        return self.peer.open_reply(getattr(self.conn.root, op)(self.peer.seal_request(request)), request)

    def ingest(self, seq: int, host: str = HOST) -> dict[str, Any]:
        """One event and a heartbeat, as HOST's agent sends them."""
        return self.call("ingest", {"host": host, "events": [event(seq, host=host)], "status": STATUS},
                         requester=f"agent:{host}", origin="agent")

    def registry(self, **args: Any) -> dict[str, Any]:
        """The `registry` operation, as the admin CLI key `test`."""
        return self.call("registry", args)

    def close(self) -> None:
        self.conn.close()


def refused(call: Callable[[], Any]) -> str:
    """The code a call is refused with (it must be refused)."""
    with pytest.raises(Refused) as info:
        call()
    return info.value.code


def refused_on_next_frame(link: Link, call: Callable[[Link], Any]) -> str:
    """The refusal of the next frame on an open, authenticated connection; should the master have
    closed that connection on revocation instead, the refusal of a frame on a new one."""
    try:
        return refused(lambda: call(link))
    except EOFError:
        return refused(lambda: call(Link(link.cluster, link.master, identity=link.identity)))


def admin_cluster(make_cluster: Callable[..., Cluster], masters: list[str]) -> Cluster:
    """agent_cluster's clients (two agents, web01 and web02), the CLI `test` an admin."""
    return agent_cluster(lambda idcs, **kw: make_cluster(idcs, admins=("test",), **kw), masters)


def heartbeat_hosts(cluster: Cluster, master: str) -> set[str]:
    with sqlite3.connect(cluster.root / f"state-{master}" / f"{master}.db") as db:
        return {host for (host,) in db.execute("SELECT host FROM auditagent")}


def listing(link: Link) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """id -> (kind, source) of what the master accepts, and id -> who revoked it."""
    reply = link.registry(action="list")
    return ({c["id"]: (c["kind"], c["source"]) for c in reply["clients"]},
            {r["id"]: r["revoked_by"] for r in reply["revoked"]})


@pytest.fixture
def links() -> Iterator[list[Link]]:
    opened: list[Link] = []
    yield opened
    for link in opened:
        link.close()


# -- admin keys in ombot.toml ---------------------------------------------------------------------


def test_admin_is_a_cli_key_s_flag(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "c", {"local": ["m1"]}, admins=("test",))
    conf = cluster.config()
    assert conf.clients["test"].admin and not conf.clients["bot"].admin and not conf.clients["console"].admin
    assert "admin" not in Cluster(tmp_path / "plain", {"local": ["m1"]}).config_path.read_text()
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(text.replace('[clients.bot]\nkind = "chat"', '[clients.bot]\nkind = "chat"\nadmin = true'))
    with pytest.raises(ConfigError) as info:
        cfg.load(cluster.config_path)
    assert info.value.key == "clients.bot.admin" and "only a cli registration may be admin" in str(info.value)
    cluster.config_path.write_text(text.replace("admin = true", 'admin = "yes"'))
    with pytest.raises(ConfigError, match="clients.test.admin: expected true or false"):
        cfg.load(cluster.config_path)


@pytest.mark.parametrize("demo", [False, True])
def test_init_makes_the_operators_cli_key_an_admin(tmp_path: Path, demo: bool) -> None:
    from ombot.app import initdir

    conf = cfg.load(initdir.init(tmp_path / "site", demo=demo))
    assert conf.client is not None
    admins = [c.id for c in conf.clients.values() if c.admin]
    assert admins == [conf.client.id] and conf.clients[conf.client.id].kind == "cli"


def test_an_agent_id_needs_no_user_name(tmp_path: Path) -> None:
    """agent-web01.prod.example.internal is a client id, not a user name: an agent's user is unused."""
    registration = cfg.parse_registration(tmp_path, "agent-web01.prod.example.internal", {
        "kind": "agent", "host": "web01.prod.example.internal", "public_key": Identity.generate().public})
    assert registration.identity == "agent:web01.prod.example.internal"
    with pytest.raises(ConfigError, match="user"):
        cfg.parse_registration(tmp_path, "ops", {"kind": "cli", "user": "Ops", "public_key": Identity.generate().public})


# -- enrolment --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_enrol_a_host_at_every_master_without_a_restart(tmp_path: Path, make_cluster: Callable[..., Cluster],
                                                        links: list[Link]) -> None:
    cluster = admin_cluster(make_cluster, ["m1", "m2"])
    cluster.start("m1")
    cluster.start("m2")
    out = tmp_path / "enrol"
    out.mkdir()
    offline = cluster.ombot("audit", "enroll", "db01", "--idc", "local", "--out", str(out), "--print-only")
    assert offline.returncode == 0, offline.stderr
    assert '[clients.agent-db01]\nkind = "agent"\nhost = "db01"' in offline.stdout  # the old, offline way
    key = Identity.load(out / "agent-db01.key")
    for master in ("m1", "m2"):  # printed, not registered: refused
        assert refused(lambda: Link(cluster, master, identity=key).ingest(1, "db01")) == "unknown_sender"

    enrolled = cluster.ombot("audit", "enroll", "db01", "--idc", "local", "--out", str(out))
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    assert "m1: accepted" in enrolled.stdout and "m2: accepted" in enrolled.stdout
    assert "reusing the key" in enrolled.stdout  # the key written above, never overwritten
    for master in ("m1", "m2"):  # at once, no restart
        links.append(Link(cluster, master, identity=key))
        assert links[-1].ingest(1, "db01")["stored"] == 1
    cluster.processes["m1"].stop()
    cluster.start("m1")
    assert Link(cluster, "m1", identity=key).ingest(2, "db01")["stored"] == 1  # kept in the master's database
    again = cluster.ombot("audit", "enroll", "db01", "--idc", "local", "--out", str(out))
    assert again.returncode == 0 and "m1: already" in again.stdout and "m2: already" in again.stdout


@pytest.mark.slow
def test_enrol_names_the_masters_to_retry(tmp_path: Path, make_cluster: Callable[..., Cluster]) -> None:
    cluster = admin_cluster(make_cluster, ["m1", "m2"])
    cluster.start("m1")  # m2 is down
    result = cluster.ombot("audit", "enroll", "db01", "--idc", "local", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "m1: accepted" in result.stdout and "m2: error:" in result.stdout
    assert "not registered at m2" in result.stderr
    cluster.start("m2")
    retried = cluster.ombot("audit", "enroll", "db01", "--idc", "local", "--out", str(tmp_path))
    assert retried.returncode == 0 and "m1: already" in retried.stdout and "m2: accepted" in retried.stdout


def test_enrolling_needs_an_admin_key(tmp_path: Path, make_cluster: Callable[..., Cluster]) -> None:
    cluster = agent_cluster(make_cluster)  # `test` is a plain cli key here
    result = cluster.ombot("audit", "enroll", "db01", "--idc", "local", "--out", str(tmp_path))
    assert result.returncode == 2 and "client test is not an admin" in result.stderr
    assert not (tmp_path / "agent-db01.key").exists()  # nothing written for a registration that cannot happen
    offline = cluster.ombot("audit", "enroll", "db01", "--idc", "local", "--out", str(tmp_path), "--print-only")
    assert offline.returncode == 0 and '[clients.agent-db01]\nkind = "agent"' in offline.stdout  # needs no admin
    too_long = cluster.ombot("audit", "enroll", "h" * 58, "--idc", "local", "--print-only")
    assert too_long.returncode == 2 and "at most 57 characters" in too_long.stderr


# -- revocation ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_revoked_agent_is_refused_at_every_master_on_its_next_frame(
        make_cluster: Callable[..., Cluster], links: list[Link]) -> None:
    cluster = admin_cluster(make_cluster, ["m1", "m2"])
    cluster.start("m1")
    cluster.start("m2")
    agents = {m: Link(cluster, m, AGENT) for m in ("m1", "m2")}
    links.extend(agents.values())
    for n, link in enumerate(agents.values()):  # authenticated connections, heartbeats stored
        assert link.ingest(n)["stored"] == 1
    assert all(HOST in heartbeat_hosts(cluster, m) for m in ("m1", "m2"))

    revoked = cluster.ombot("audit", "revoke", HOST)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert f"m1: {AGENT}: revoked" in revoked.stdout and f"m2: {AGENT}: revoked" in revoked.stdout
    for master, link in agents.items():  # the very next frame, on the connection already open
        assert refused_on_next_frame(link, lambda l: l.ingest(9)) == "revoked", master
        assert HOST not in heartbeat_hosts(cluster, master)  # no longer watched: never reported silent
        assert Link(cluster, master, "agent-web02").ingest(1, "web02")["stored"] == 1  # the other agent is untouched

    cluster.stop_all()  # ombot.toml unchanged: agent-web01 still in every accept list
    assert AGENT in cluster.config().masters["m1"].accept
    cluster.start("m1")
    cluster.start("m2")
    for master in ("m1", "m2"):
        assert refused(lambda: Link(cluster, master, AGENT).ingest(10)) == "revoked"
        accepted, gone = listing(Link(cluster, master, "test"))
        assert AGENT not in accepted and gone == {AGENT: "test"} and accepted["agent-web02"] == ("agent", "config")
    again = cluster.ombot("audit", "revoke", HOST)
    assert again.returncode == 0 and f"m1: {AGENT}: revoked before" in again.stdout


@pytest.mark.slow
def test_revocation_holds_for_every_client_kind(make_cluster: Callable[..., Cluster], links: list[Link]) -> None:
    cluster = make_cluster({"local": ["m1"]}, clients={"bot": "chat", "test": "cli", "console": "chat", "ops": "cli"},
                           admins=("test",))
    cluster.start("m1")
    assert cluster.ombot("--client", "ops", "masters").returncode == 0
    ops = cluster.router(client="ops", requester="cli:ops")  # keeps its connection open between calls
    bot = cluster.router("U0ALICE")
    try:
        assert ops.health()[0]["ok"] and bot.health()[0]["ok"]
        result = cluster.ombot("clients", "revoke", "ops", "bot")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "m1: ops: revoked" in result.stdout and "m1: bot: revoked" in result.stdout
        for router in (ops, bot):  # the very next frame, on the pooled connection
            report = router.health()[0]
            assert not report["ok"] and "revoked" in report["error"]
    finally:
        ops.close()
        bot.close()
    masters = cluster.ombot("--client", "ops", "masters")
    assert masters.returncode == 1 and "revoked" in masters.stdout
    run = cluster.ombot("--client", "ops", "run", "echo", "localhost", "message=hi")
    assert run.returncode == 2 and "refused (revoked)" in run.stderr
    cluster.processes["m1"].stop()
    cluster.start("m1")  # still listed in ombot.toml, still refused
    assert cluster.ombot("--client", "ops", "run", "echo", "localhost", "message=hi").returncode == 2
    assert cluster.ombot("masters").returncode == 0  # the admin's own key works on


def test_the_old_revoke_that_revoked_nothing_is_gone(make_cluster: Callable[..., Cluster]) -> None:
    cluster = admin_cluster(make_cluster, ["m1"])
    cluster.start("m1")
    unknown = cluster.ombot("audit", "revoke", "nosuchhost")
    assert unknown.returncode == 1 and "no master knows an audit agent of nosuchhost" in unknown.stderr
    assert "remove the [clients." not in unknown.stdout  # no more instructions to edit a file
    ghost = cluster.ombot("clients", "revoke", "ghost")
    assert ghost.returncode == 1 and "m1: ghost: not registered here" in ghost.stdout
    cluster.processes["m1"].stop()  # a master that cannot be reached is named, and is no success
    down = cluster.ombot("audit", "revoke", HOST)
    assert down.returncode == 1 and "not confirmed by m1" in down.stderr


# -- who may call registry, and what it refuses ------------------------------------------------------


def test_only_admin_keys_may_call_registry(make_cluster: Callable[..., Cluster], links: list[Link]) -> None:
    cluster = make_cluster({"local": ["m1"]}, clients={**CLIENTS, "ops": "cli"}, admins=("test",))
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(text.replace(f'[clients.{AGENT}]\nkind = "agent"',
                                                f'[clients.{AGENT}]\nkind = "agent"\nhost = "{HOST}"')
                                   .replace('[clients.agent-web02]\nkind = "agent"',
                                            '[clients.agent-web02]\nkind = "agent"\nhost = "web02"'))
    cluster.start("m1")
    args = {"action": "list"}
    for client, requester, origin in (("bot", "U0ALICE", "slack"), ("ops", "cli:ops", "cli"),
                                      (AGENT, f"agent:{HOST}", "agent")):
        link = Link(cluster, "m1", client)
        links.append(link)
        assert refused(lambda: link.call("registry", args, requester, origin)) == "not_permitted", client
    admin = Link(cluster, "m1", "test")
    links.append(admin)
    accepted, gone = listing(admin)
    assert accepted["test"] == ("cli", "config") and gone == {}
    assert refused(lambda: admin.call("registry", args, "cli:someone-else")) == "bad_requester"
    result = cluster.ombot("--client", "ops", "clients", "list")
    assert result.returncode == 2 and "client ops is not an admin" in result.stderr


def test_bad_registrations_are_refused_and_change_nothing(make_cluster: Callable[..., Cluster],
                                                          links: list[Link]) -> None:
    cluster = admin_cluster(make_cluster, ["m1"])
    cluster.start("m1")
    admin = Link(cluster, "m1", "test")
    links.append(admin)
    before = listing(admin)
    bot_key = cluster.config().clients["bot"].public_key

    def agent(client_id: str = "agent-db01", **changes: Any) -> dict[str, Any]:
        return {"id": client_id, "kind": "agent", "host": "db01", "public_key": Identity.generate().public, **changes}

    cases = [
        ([agent(kind="chat")], "bad_request", "kind must be one of agent, cli, console"),
        ([agent(admin=True)], "bad_request", "unknown field(s) admin"),
        ([agent(key_file="/tmp/x")], "bad_request", "unknown field(s) key_file"),
        ([agent(host="bad host")], "bad_request", "host"),
        ([agent(host="")], "bad_request", "host"),
        ([agent("bad id")], "bad_request", "name"),
        ([agent(public_key="AAAA")], "bad_request", "public key"),
        ([{"id": "ops", "kind": "cli", "public_key": Identity.generate().public}], "bad_request", "needs its user"),
        ([agent(f"agent-h{n}", host=f"h{n}") for n in range(1001)], "batch_too_large", "at most 1000"),
        ([agent(public_key=bot_key)], "conflict", "already bot's"),
        ([agent(AGENT, host=HOST)], "conflict", "another key"),
        ([agent(), agent("agent-db02", host="db02"), agent("agent-x", public_key=bot_key)], "conflict", "bot's"),
        ([agent(), agent()], "bad_request", "the same id twice"),
        ("not a list", "bad_request", "non-empty list"),
    ]
    for clients, code, words in cases:
        with pytest.raises(Refused) as info:
            admin.registry(action="add", clients=clients)
        assert info.value.code == code and words in info.value.message, (clients if isinstance(clients, str)
                                                                          else clients[:2], info.value.as_dict())
    assert listing(admin) == before  # nothing changed, not even the good ones of a refused batch
    assert refused(lambda: admin.registry(action="grant")) == "bad_request"
    assert refused(lambda: admin.registry(action="revoke", ids=["test"])) == "not_permitted"  # not itself
    assert refused(lambda: admin.registry(action="revoke", ids=[])) == "bad_request"
    assert listing(admin) == before

    fresh = agent()
    assert admin.registry(action="add", clients=[fresh])["results"] == {"agent-db01": "added"}
    assert admin.registry(action="add", clients=[fresh])["results"] == {"agent-db01": "already"}  # idempotent
    assert admin.registry(action="revoke", ids=["agent-db01", "ghost"])["results"] == {
        "agent-db01": "revoked", "ghost": "unknown"}
    with pytest.raises(Refused) as info:  # a revoked key never comes back, under any id
        admin.registry(action="add", clients=[{**fresh, "id": "agent-db01b"}])
    assert info.value.code == "revoked_key"
    other = agent()  # the id is free again, with a new key
    assert admin.registry(action="add", clients=[other])["results"] == {"agent-db01": "added"}

    request = new_request("registry", "m1", "cli:test", "cli", {"action": "revoke", "ids": ["agent-db01"]})
    frame = admin.peer.seal_request(request)
    admin.peer.open_reply(admin.conn.root.registry(frame), request)
    with pytest.raises(Refused) as info:  # state-changing: a replayed revoke is refused
        admin.peer.open_reply(admin.conn.root.registry(frame), request)
    assert info.value.code == "replay"


def test_an_admin_adds_an_operator_without_a_restart(make_cluster: Callable[..., Cluster], links: list[Link]) -> None:
    """A cli key added with `registry` works at once, as its registration says (cli:USER, its globs)."""
    cluster = make_cluster({"local": ["m1"]}, admins=("test",))
    cluster.start("m1")
    admin = Link(cluster, "m1", "test")
    links.append(admin)
    alice = Identity.generate()
    add = ("clients", "add", "alice", "--kind", "cli", "--user", "alice", "--public-key", alice.public,
           "--module", "echo", "--host", "web*")
    added = cluster.ombot(*add)
    assert added.returncode == 0 and added.stdout.strip() == "m1: accepted", added.stdout + added.stderr
    again = cluster.ombot(*add)
    assert again.returncode == 0 and again.stdout.strip() == "m1: already"
    clash = cluster.ombot(*add[:-4], "--module", "*")  # the same id and key, other globs: revoke it first
    assert clash.returncode == 1 and "m1: refused (conflict)" in clash.stdout
    assert admin.registry(action="list")["clients"][0] | {"added_at": 0} == {
        "id": "alice", "kind": "cli", "source": "registry", "user": "alice", "host": "", "admin": False,
        "public_key": alice.public, "modules": ["echo"], "hosts": ["web*"], "added_at": 0, "added_by": "test"}
    link = Link(cluster, "m1", identity=alice)
    links.append(link)
    assert link.call("health", {}, "cli:alice")["master"] == "m1"
    assert refused(lambda: link.call("health", {}, "cli:test")) == "bad_requester"
    assert refused(lambda: link.call("registry", {"action": "list"}, "cli:alice")) == "not_permitted"
    submit = {"module": "facts", "params": {}, "hosts": ["web01"], "idc": "local", "approvers": [], "timeout": None}
    assert refused(lambda: link.call("submit", submit, "cli:alice")) == "not_permitted"  # its globs hold

    # This master had no agent, so no audit tables: the first agent enrolled gets them.
    enrolled = cluster.ombot("audit", "enroll", HOST, "--idc", "local", "--out", str(cluster.root))
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    agent = Link(cluster, "m1", identity=Identity.load(cluster.root / f"{AGENT}.key"))
    links.append(agent)
    assert agent.ingest(1)["stored"] == 1


# -- per master, in a shared database --------------------------------------------------------------------


def test_masters_sharing_a_database_keep_their_own_registrations(master_db: peewee.Database) -> None:  # noqa: F811
    from ombot.masters.registry import ClientRegistry
    from ombot.config import ClientRegistration

    keys = {name: Identity.generate().public for name in ("bot", "test", "agent-web01", "agent-db01")}
    configured = {
        "bot": ClientRegistration("bot", keys["bot"], "chat", "bot", modules=("*",), hosts=("*",)),
        "test": ClientRegistration("test", keys["test"], "cli", "test", admin=True),
        "agent-web01": ClientRegistration("agent-web01", keys["agent-web01"], "agent", "agent-web01", host="web01"),
    }
    m1, m2 = ClientRegistry("m1", configured), ClientRegistry("m2", configured)
    db01 = {"id": "agent-db01", "kind": "agent", "host": "db01", "public_key": keys["agent-db01"]}
    assert m1.add([db01], "test") == {"agent-db01": "added"}
    # no audit tables in this database: revoking an agent still works (its heartbeat has nowhere to be)
    assert m2.revoke(["bot"], ["web01"], "test") == {"bot": "revoked", "agent-web01": "revoked"}
    revoked_here: list[set[str]] = []
    m2.on_revoke(revoked_here.append)
    assert m2.revoke([], ["web01"], "test") == {"agent-web01": "already"} and revoked_here == []

    for fresh in (ClientRegistry("m1", configured), ClientRegistry("m2", configured)):  # as after a restart
        assert set(fresh) == ({"bot", "test", "agent-web01", "agent-db01"} if fresh.master_id == "m1"
                              else {"test"})
    m1_again, m2_again = ClientRegistry("m1", configured), ClientRegistry("m2", configured)
    raw = {name: bytes(decode_public(key)) for name, key in keys.items()}
    assert m1_again.sender(raw["agent-db01"]) == "agent-db01" and m1_again.sender(raw["bot"]) == "bot"
    assert m2_again.sender(raw["agent-db01"]) is None  # never added at m2: unknown there
    assert refused(lambda: m2_again.sender(raw["bot"])) == "revoked"
    assert m2_again.listing()["revoked"][0]["revoked_by"] == "test"
    m1_again.on_revoke(revoked_here.append)
    m1_again.revoke(["agent-db01"], [], "test")
    assert revoked_here == [{"agent-db01"}] and "agent-db01" not in m1_again


def test_the_docs_describe_the_operation() -> None:
    protocol = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    assert "| `registry` |" in protocol and "Revocation takes a master restart" not in protocol
