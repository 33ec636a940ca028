"""From one machine to a fleet (issue 20, items 1 and 5): many hosts enrolled and revoked at once, hosts
enrolled pending whose keys are made on the host and bound by a master's signed certificate (directly,
or on the agent's first contact with another master of the IDC), `ombot audit agents`, and an
agent.toml whose settings cannot land in a [[masters]] table.

The registry's rules run in-process on every database engine (`master_db`); the CLI, the `bind`
operation and a real agent run against real masters (the slow ones)."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peewee
import pytest
import rpyc

from ombot.config import ClientRegistration
from ombot.envelope import Opener, Peer, Refused, new_request
from ombot.keys import Identity, decode_public
from ombot.storage import migrate
from tests.rigs import write_records
from tests.support import Cluster, child_env, wait_for

IDC = "local"


# -- helpers ------------------------------------------------------------------------------------------


def refused(call: Callable[[], Any]) -> Refused:
    """The refusal a call must end in."""
    with pytest.raises(Refused) as info:
        call()
    return info.value


class Site:
    """The masters of two IDCs as the registry sees them: each its own identity, `local` (m1, m2) and
    `far` (f1); a registry per master, all in the one test database (each keeps its own rows)."""

    def __init__(self) -> None:
        self.keys = {m: Identity.generate() for m in ("m1", "m2", "f1")}
        self.idc = {"m1": IDC, "m2": IDC, "f1": "far"}

    def registry(self, master: str, configured: dict[str, ClientRegistration] | None = None) -> Any:
        from ombot.masters.enrolment import Signer
        from ombot.masters.registry import ClientRegistry

        peers = {m: k.public for m, k in self.keys.items() if self.idc[m] == self.idc[master]}
        return ClientRegistry(master, configured or {}, Signer(self.keys[master], self.idc[master], peers))


def enrolment(n: int = 1) -> str:
    return f"{n:032x}"


def binding(registry: Any, certificate: dict[str, str], key: Identity, host: str = "web01",
            requester: str | None = None) -> dict[str, Any]:
    """The `bind` operation as `key` sends it to `registry` (an agent's first contact)."""
    request = new_request("bind", registry.master_id, requester or f"agent:{host}", "agent",
                          {"certificate": certificate})
    result: dict[str, Any] = registry.bind_request(request, key.verify_key_bytes)
    return result


def statement(certificate: dict[str, str]) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(certificate["statement"])
    return value


def signed_by(key: Identity, claims: dict[str, Any]) -> dict[str, str]:
    """A certificate as a master with `key` would sign it, for `claims`."""
    from ombot.envelope import dumps

    text = dumps(claims).decode()
    return {"statement": text, "signature": base64.b64encode(key.signing_key.sign(text.encode()).signature).decode()}


@pytest.fixture
def site(master_db: peewee.Database) -> Site:
    return Site()


# -- binding keys made on the host (in-process, every engine) -----------------------------------------------


def test_a_pending_host_is_bound_by_its_master_and_by_certificate_at_the_others(site: Site) -> None:
    m1, m2 = site.registry("m1"), site.registry("m2")
    for registry in (m1, m2):
        assert registry.enroll([{"host": "web01", "enrolment": enrolment()}], "test") == ({"web01": "pending"}, {})
        assert "agent-web01" not in registry and registry.agents({})["agents"][0]["state"] == "pending"
    key = Identity.generate()

    cert = m1.bind("web01", key.public, "rollout#7")  # the rollout job, on m1, once the host made its key
    claims = statement(cert)
    assert claims == {"type": "ombot-agent-binding/1", "host": "web01", "idc": IDC, "public_key": key.public,
                      "bound_at": claims["bound_at"], "master": "m1", "enrolment": enrolment()}
    assert abs(claims["bound_at"] - time.time() * 1000) < 60_000  # epoch ms, UTC
    decode_public(site.keys["m1"].public).verify(cert["statement"].encode(), base64.b64decode(cert["signature"]))
    assert m1.sender(key.verify_key_bytes) == "agent-web01" and m1["agent-web01"].host == "web01"
    assert m1.bind("web01", key.public, "rollout#8") == cert  # again: the same key, the same certificate
    assert refused(lambda: m1.bind("web01", Identity.generate().public, "x")).code == "conflict"

    assert m2.sender(key.verify_key_bytes) is None  # m2 knows nothing of the key yet...
    assert binding(m2, cert, key) == {"master": "m2", "host": "web01", "id": "agent-web01", "result": "bound"}
    assert m2.sender(key.verify_key_bytes) == "agent-web01"  # ...until its first contact
    assert binding(m2, cert, key)["result"] == "already"  # a re-sent bind changes nothing
    [row] = m2.agents({})["agents"]
    assert (row["state"], row["public_key"], row["enrolment"]) == ("bound", key.public, enrolment())
    assert m2.listing()["pending"] == [] and m2.enroll([{"host": "web01", "enrolment": enrolment()}], "t")[0] == {
        "web01": "bound"}


def test_a_certificate_binds_only_the_key_that_sends_it_for_its_own_host_and_idc(site: Site) -> None:
    m1, m2, f1 = site.registry("m1"), site.registry("m2"), site.registry("f1")
    for registry in (m1, m2, f1):
        registry.enroll([{"host": "web01", "enrolment": enrolment()}, {"host": "web02", "enrolment": enrolment(2)}], "t")
    web01, web02, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    cert01, cert02 = m1.bind("web01", web01.public, "job"), m1.bind("web02", web02.public, "job")
    far = f1.bind("web01", web01.public, "job")  # the same host name in another IDC, bound there

    assert refused(lambda: binding(m2, cert01, stranger)).code == "wrong_key"  # someone else's certificate
    assert refused(lambda: binding(m2, cert02, web01, host="web02")).code == "wrong_key"  # another host's
    assert refused(lambda: binding(m2, cert01, web01, requester="agent:web02")).code == "bad_requester"
    wrong_idc = refused(lambda: binding(m2, far, web01))
    assert wrong_idc.code == "wrong_idc" and "from IDC 'far'" in wrong_idc.message
    claims = statement(cert01)
    # another IDC's master signing a statement that claims this IDC: not a master of it here
    assert refused(lambda: binding(m2, signed_by(site.keys["f1"], {**claims, "master": "f1"}), web01)).code == "wrong_idc"
    forged = signed_by(stranger, {**claims, "master": "m1"})  # m1's name, any other key
    assert refused(lambda: binding(m2, forged, web01)).message == \
        "the certificate's signature does not verify with master m1's key"
    tampered = {**cert02, "statement": cert02["statement"].replace(web02.public, web01.public).replace("web02", "web01")}
    assert refused(lambda: binding(m2, tampered, web01)).code == "bad_certificate"
    for bad in (None, "text", {"statement": cert01["statement"]}, {**cert01, "extra": 1},
                {"statement": cert01["statement"], "signature": "not base64!"},
                {"statement": "x" * 2000, "signature": cert01["signature"]},
                signed_by(site.keys["m1"], {k: v for k, v in claims.items() if k != "enrolment"}),
                signed_by(site.keys["m1"], {**claims, "type": "something-else"}),
                signed_by(site.keys["m1"], {**claims, "bound_at": "yesterday"})):
        assert refused(lambda: binding(m2, bad, web01)).code == "bad_certificate", bad  # type: ignore[arg-type]
    assert m2.sender(web01.verify_key_bytes) is None  # nothing of it bound anything
    assert binding(m2, cert01, web01)["result"] == "bound"  # the real one still does


def test_a_certificate_binds_only_a_host_pending_here_under_its_enrolment(site: Site) -> None:
    m1, m2 = site.registry("m1"), site.registry("m2")
    key = Identity.generate()
    m1.enroll([{"host": "web01", "enrolment": enrolment()}], "t")
    not_pending = refused(lambda: m1.bind("db01", key.public, "job"))
    assert not_pending.code == "not_enrolled" and "ombot audit enroll db01 --idc local" in not_pending.message
    cert = m1.bind("web01", key.public, "job")
    assert refused(lambda: binding(m2, cert, key)).code == "not_enrolled"  # m2 was never told to expect web01
    m2.enroll([{"host": "web01", "enrolment": enrolment(9)}], "t")  # another enrolment of it
    assert refused(lambda: binding(m2, cert, key)).code == "wrong_enrolment"
    hand = Identity.generate()  # a host enrolled with --out: its key registered, nothing to bind
    m2.add([{"id": "agent-db01", "kind": "agent", "host": "db01", "public_key": hand.public}], "t")
    assert m2.enroll([{"host": "db01", "enrolment": enrolment(3)}], "t") == ({"db01": "bound"}, {})
    assert refused(lambda: m2.bind("db01", hand.public, "job")).code == "not_enrolled"


def test_revoking_ends_a_pending_enrolment_and_no_certificate_revives_it(site: Site) -> None:
    m1, m2 = site.registry("m1"), site.registry("m2")
    for registry in (m1, m2):
        registry.enroll([{"host": "web01", "enrolment": enrolment()}], "t")
    key = Identity.generate()
    cert = m1.bind("web01", key.public, "job")  # bound at m1; m2 never saw the agent

    assert m1.revoke([], ["web01"], "test") == {"agent-web01": "revoked"}
    assert m2.revoke([], ["web01"], "test") == {"agent-web01": "revoked"}  # the pending enrolment, by host
    assert m2.revoke(["agent-web01"], [], "test") == {"agent-web01": "already"}
    assert refused(lambda: m1.sender(key.verify_key_bytes)).code == "revoked"
    assert refused(lambda: m1.bind("web01", key.public, "job")).code == "revoked_key"
    replayed = refused(lambda: binding(m2, cert, key))  # the stolen certificate, after the revoke
    assert replayed.code == "revoked" and "enrol it anew" in replayed.message
    assert m2.sender(key.verify_key_bytes) is None
    assert [(a["host"], a["state"]) for a in m2.agents({})["agents"]] == [("web01", "revoked")]

    # Enrolled anew (a new enrolment, as the CLI makes when the old one is revoked): the old certificate
    # and key still bind nothing, anywhere; the old enrolment id can never be reused.
    for registry in (m1, m2):
        assert registry.enroll([{"host": "web01", "enrolment": enrolment()}], "t") == (
            {"web01": "revoked"}, {"web01": "web01's enrolment 00000000 was revoked here: a new enrolment is needed"})
        assert registry.enroll([{"host": "web01", "enrolment": enrolment(2)}], "t")[0] == {"web01": "pending"}
    assert refused(lambda: binding(m2, cert, key)).code == "wrong_enrolment"
    assert refused(lambda: m1.bind("web01", key.public, "job")).code == "revoked_key"
    fresh = Identity.generate()
    assert binding(m2, m1.bind("web01", fresh.public, "job"), fresh)["result"] == "bound"


def test_enrolling_again_is_safe_and_refusals_are_per_host(site: Site) -> None:
    configured = {"ops": ClientRegistration("ops", Identity.generate().public, "cli", "ops")}
    m1 = site.registry("m1", configured)
    first = [{"host": h, "enrolment": enrolment(n)} for n, h in enumerate(("web01", "web02"))]
    assert m1.enroll(first, "t") == ({"web01": "pending", "web02": "pending"}, {})
    again = [*first[:1], {"host": "web02", "enrolment": enrolment(7)}, {"host": "web03", "enrolment": enrolment(3)}]
    results, problems = m1.enroll(again, "t")
    assert results == {"web01": "already", "web02": "conflict", "web03": "pending"}  # web03 went on
    assert list(problems) == ["web02"] and "pending here under another enrolment" in problems["web02"]
    m1.add([{"id": "agent-ops", "kind": "cli", "user": "ops", "public_key": Identity.generate().public}], "t")
    assert m1.enroll([{"host": "ops", "enrolment": enrolment(4)}], "t")[0] == {"ops": "conflict"}

    cases = [
        ([{"host": "bad host", "enrolment": enrolment()}], "bad_request", "not a host name"),
        ([{"host": "h" * 58, "enrolment": enrolment()}], "bad_request", "at most 57 characters"),
        ([{"host": "web09", "enrolment": "ABC"}], "bad_request", "32 lowercase hex digits"),
        ([{"host": "web09", "enrolment": enrolment(), "public_key": "x"}], "bad_request", "exactly"),
        ([{"host": "web09", "enrolment": enrolment()}] * 2, "bad_request", "the same host twice"),
        ([{"host": f"h{n}", "enrolment": enrolment(n)} for n in range(1001)], "batch_too_large", "at most 1000"),
        ([], "bad_request", "non-empty list"),
    ]
    before = m1.agents({})
    for entries, code, words in cases:
        problem = refused(lambda: m1.enroll(entries, "t"))
        assert problem.code == code and words in problem.message, (entries[:1], problem.as_dict())
    assert m1.agents({}) == before  # a refused request changed nothing


def test_enrolments_and_bound_keys_survive_a_restart(site: Site) -> None:
    m1 = site.registry("m1")
    m1.enroll([{"host": h, "enrolment": enrolment(n)} for n, h in enumerate(("web01", "web02", "web03"))], "t")
    key = Identity.generate()
    cert = m1.bind("web01", key.public, "job")
    m1.revoke([], ["web03"], "test")
    again = site.registry("m1")  # as after a restart
    assert again.sender(key.verify_key_bytes) == "agent-web01"
    assert [(a["host"], a["state"]) for a in again.agents({})["agents"]] == [
        ("web01", "bound"), ("web02", "pending"), ("web03", "revoked")]
    assert again.bind("web01", key.public, "job") == cert
    assert [p["host"] for p in again.listing()["pending"]] == ["web02"]
    assert site.registry("m2").agents({})["agents"] == []  # another master's rows are its own


def test_agents_pages_through_every_host_with_its_heartbeat(site: Site) -> None:
    from ombot.masters.audit import AuditIngest

    m1 = site.registry("m1")
    m1.enroll([{"host": f"web{n:02d}", "enrolment": enrolment(n)} for n in range(1, 6)], "t")
    new, old = Identity.generate(), Identity.generate()
    m1.bind("web01", new.public, "job")
    m1.bind("web02", old.public, "job")
    ingest = AuditIngest(m1, master_settings())
    counters = {"spool_depth": 4, "dropped_total": 0, "sent_total": 9}
    for host, status, software in (("web01", {**counters, "version": "0.2.0", "sources": ["spool", "auditd"]}, None),
                                   ("web02", counters, "")):  # web02: an agent from before 0.2.0 says neither
        request = new_request("ingest", "m1", f"agent:{host}", "agent", {"host": host, "events": [], "status": status},
                              software=software)
        assert ingest.ingest(m1[f"agent-{host}"], request)["acked"] == []
    first = m1.agents({"limit": 2})
    assert [a["host"] for a in first["agents"]] == ["web01", "web02"] and first["more"]
    web01, web02 = first["agents"]
    assert (web01["version"], web01["sources"], web01["spool_depth"]) == ("0.2.0", ["spool", "auditd"], 4)
    assert (web02["version"], web02["sources"], web02["state"]) == (None, None, "bound")
    rest = m1.agents({"after": "web02", "limit": 2})
    assert [a["host"] for a in rest["agents"]] == ["web03", "web04"] and rest["more"]
    assert [a["host"] for a in m1.agents({"after": "web04"})["agents"]] == ["web05"]
    assert "last_seen" not in rest["agents"][0]  # pending: never heard from
    only = m1.agents({"hosts": ["web05", "web01", "nosuch"]})
    assert [a["host"] for a in only["agents"]] == ["web01", "web05"] and not only["more"]
    for args, code in (({"limit": 0}, "bad_request"), ({"limit": 1001}, "bad_request"), ({"after": 3}, "bad_request"),
                       ({"hosts": [f"h{n}" for n in range(1001)]}, "batch_too_large"), ({"hosts": "web01"}, "bad_request")):
        assert refused(lambda: m1.agents(args)).code == code, args


def master_settings() -> Any:
    """A master's settings for the audit ingest run in-process."""
    from ombot import config as cfg

    return cfg.MasterSettings("m1", IDC, "127.0.0.1", 1, "k", None, None, "local", (), Path("/nonexistent"),
                              "sqlite://", cfg.Limits())


def test_heartbeats_carry_the_agent_version_from_the_envelope_when_the_status_has_none(site: Site) -> None:
    from ombot import __version__
    from ombot.masters.audit import AuditAgent, AuditIngest

    m1 = site.registry("m1")
    m1.add([{"id": "agent-web01", "kind": "agent", "host": "web01", "public_key": Identity.generate().public}], "t")
    ingest = AuditIngest(m1, master_settings())
    status = {"spool_depth": 0, "dropped_total": 0, "sent_total": 0}
    request = new_request("ingest", "m1", "agent:web01", "agent", {"host": "web01", "events": [], "status": status})
    ingest.ingest(m1["agent-web01"], request)
    assert AuditAgent.get_by_id("web01").version == f"ombot-agent {__version__}"  # the envelope's "sw"
    for bad in ({"version": "x" * 65}, {"version": "tab\there"}, {"sources": "spool"}, {"sources": ["Spool"]},
                {"sources": [f"s{n}" for n in range(9)]}):
        bad_request = new_request("ingest", "m1", "agent:web01", "agent",
                                  {"host": "web01", "events": [], "status": {**status, **bad}})
        assert refused(lambda: ingest.ingest(m1["agent-web01"], bad_request)).code == "bad_request", bad


def test_the_heartbeat_table_of_an_older_master_gains_version_and_sources(master_db: peewee.Database) -> None:
    """A master's audit tables from before heartbeats named the agent's version and capture layers: the
    upgrade adds both columns and keeps the rows, on every engine."""
    from ombot.masters import audit as master_audit
    from ombot.masters.audit import AuditAgent

    migrate(master_db, "audit", master_audit.MIGRATIONS[:3])
    master_db.execute_sql("DROP TABLE auditagent")
    master_db.execute_sql("CREATE TABLE auditagent (host VARCHAR(255) PRIMARY KEY, last_seen BIGINT NOT NULL, "
                          "spool_depth BIGINT NOT NULL, dropped_total BIGINT NOT NULL, sent_total BIGINT NOT NULL, "
                          "problem TEXT NULL)")
    master_db.execute_sql("INSERT INTO auditagent VALUES ('web01', 5, 1, 2, 3, NULL)")
    migrate(master_db, "audit", master_audit.MIGRATIONS)
    row = AuditAgent.get_by_id("web01")
    assert (row.last_seen, row.sent_total, row.version, row.sources) == (5, 3, None, None)
    AuditAgent.update(version="0.2.0", sources=["spool"]).execute()
    assert (AuditAgent.get_by_id("web01").version, AuditAgent.get_by_id("web01").sources) == ("0.2.0", ["spool"])
    migrate(master_db, "audit", master_audit.MIGRATIONS)  # nothing left to run


def test_a_registry_from_before_enrolments_is_upgraded_in_place(master_db: peewee.Database) -> None:
    from ombot.masters import registry as master_registry
    from ombot.masters.registrations import RegisteredClient

    migrate(master_db, "registry", master_registry.MIGRATIONS[:1])  # issue 17's tables only
    kept = Identity.generate()
    RegisteredClient.create(master_id="m1", client_id="agent-db01", kind="agent", public_key=kept.public,
                            user="agent-db01", host="db01", modules=[], hosts=[], added_at=1, added_by="test")
    m1 = Site().registry("m1")
    assert m1.sender(kept.verify_key_bytes) == "agent-db01"
    assert m1.enroll([{"host": "web01", "enrolment": enrolment()}], "t")[0] == {"web01": "pending"}
    assert [(a["host"], a["state"]) for a in m1.agents({})["agents"]] == [("db01", "bound"), ("web01", "pending")]


def test_binds_from_unknown_keys_are_rate_limited_before_any_crypto(site: Site) -> None:
    from ombot.masters.enrolment import BIND_BURST

    m1 = site.registry("m1")
    m1.add([{"id": "agent-web01", "kind": "agent", "host": "web01", "public_key": (known := Identity.generate()).public}],
           "t")

    def frame(key: Identity) -> bytes:
        return b"OMB1" + key.verify_key_bytes + os.urandom(100)

    for _ in range(BIND_BURST):
        m1.admit_bind(frame(Identity.generate()))
    busy = refused(lambda: m1.admit_bind(frame(Identity.generate())))
    assert busy.code == "busy" and 0 < busy.details["retry_after"] <= 1
    m1.admit_bind(frame(known))  # an agent bound already is no stranger: never held back
    m1.admit_bind(b"short")  # the opener refuses that one, for free


def test_the_opener_takes_a_bind_from_an_unknown_key_and_nothing_else() -> None:
    master, known, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    opener = Opener(master, "m1", {"bot": known.verify_key}, 1 << 20, 60, 300, unregistered={"bind": 8192})
    peer = Peer(stranger, master.verify_key)
    bind = new_request("bind", "m1", "agent:web01", "agent", {"certificate": {}})
    request, _ = opener.open(peer.seal_request(bind), "bind")
    assert request.sender == "" and request.args == {"certificate": {}}
    assert opener._peers == {}  # a stranger's key is never cached: anyone can make keys
    health = new_request("health", "m1", "agent:web01", "agent", {})
    assert refused(lambda: opener.open(peer.seal_request(health), "health")).code == "unknown_sender"
    big = new_request("bind", "m1", "agent:web01", "agent", {"certificate": {"statement": "x" * 9000}})
    too_large = refused(lambda: opener.open(peer.seal_request(big), "bind"))
    assert too_large.code == "frame_too_large" and too_large.details["cap"] == 8192
    not_a_point = b"OMB1" + bytes(32) + peer.seal_request(bind)[36:]
    assert refused(lambda: opener.open(not_a_point, "bind")).code in ("bad_frame", "bad_mac")
    plain = Opener(master, "m1", {"bot": known.verify_key}, 1 << 20, 60, 300)  # no op open to strangers
    assert refused(lambda: plain.open(peer.seal_request(bind), "bind")).code == "unknown_sender"


# -- the agent: agent.toml, its start line, keygen --------------------------------------------------------


MASTERS = [("m1", "127.0.0.1", 18861, Identity.generate().public), ("m2", "::1", 18862, Identity.generate().public)]


def test_agent_toml_keeps_every_setting_above_the_masters(tmp_path: Path) -> None:
    from ombot.audit_agent.settings import load, render
    from ombot.errors import ConfigError

    AUDITD_LOG = "/var/log/audit/audit.log"

    text = render("web01", IDC, "agent.key", MASTERS)
    top, tables = text.split("\n[[masters]]", 1)
    for key in ("host", "idc", "key_file", "spool_dir", "state_dir"):
        assert f"\n{key} = " in "\n" + top  # set, above the tables
    for key in ("auditd_log", "binding_file", "max_events", "batch_events", "heartbeat_seconds"):
        assert f"\n# {key} = " in top and f"{key} =" not in tables  # commented, with its default
    path = tmp_path / "agent.toml"
    path.write_text(text)
    Identity.generate().save(tmp_path / "agent.key")
    plain = load(path)
    assert plain.auditd_log is None and plain.binding == tmp_path / "agent.binding" and plain.max_events == 100_000
    assert [(m.id, m.host, m.port) for m in plain.masters] == [("m1", "127.0.0.1", 18861), ("m2", "::1", 18862)]

    # as docs/audit.md says: uncomment the line (here with sed, as a script would)
    subprocess.run(["sed", "-i", "s|^# auditd_log = |auditd_log = |; s|^# max_events = 100000|max_events = 500|",
                    str(path)], check=True)
    edited = load(path)
    assert edited.auditd_log == Path(AUDITD_LOG) and edited.max_events == 500 and edited.sources() == ["spool", "auditd"]

    path.write_text(text + f'auditd_log = "{AUDITD_LOG}"\n')  # appended at the end: inside the last table
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "masters[1].auditd_log" and "goes above the first [[masters]] table" in str(info.value)


def test_the_agent_names_its_sources_and_masters_and_reports_them(tmp_path: Path) -> None:
    from ombot import __version__
    from ombot.audit_agent.agent import Agent
    from ombot.audit_agent.settings import load, render

    text = render("web01", IDC, "agent.key", MASTERS, spool_dir=str(tmp_path / "spool"),
                  state_dir=str(tmp_path / "state"))
    (tmp_path / "agent.toml").write_text(text.replace("# auditd_log = ", "auditd_log = ").replace(
        '"/var/log/audit/audit.log"', f'"{tmp_path / "audit.log"}"'))
    Identity.generate().save(tmp_path / "agent.key")
    agent = Agent(load(tmp_path / "agent.toml"))
    try:
        line = agent.describe()
        status = agent.status()
    finally:
        agent.queue.close()
    assert line == (f"audit agent {__version__} for web01 in {IDC}: sources spool {tmp_path / 'spool'}, auditd "
                    f"{tmp_path / 'audit.log'}; masters m1@127.0.0.1:18861, m2@[::1]:18862; 0 event(s) queued")
    assert status["version"] == __version__ and status["sources"] == ["spool", "auditd"]


def test_keygen_makes_the_key_once_and_prints_its_public_half(tmp_path: Path) -> None:
    key = tmp_path / "etc" / "agent.key"

    def keygen() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ombot.audit_agent", "keygen", "--key", str(key)],
                              capture_output=True, text=True, env=child_env(), timeout=60)

    first, second = keygen(), keygen()
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout == Identity.load(key).public + "\n"  # made once, then read
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    key.chmod(0o644)  # a key others can read is refused, not printed
    loose = keygen()
    assert loose.returncode == 2 and "error:" in loose.stderr and not loose.stdout


# -- the CLI's own arithmetic ---------------------------------------------------------------------------------


def test_revocations_go_in_calls_under_the_masters_cap(tmp_path: Path) -> None:
    from ombot import config as cfg
    from ombot.app.auditcmd import _revocations
    from ombot.app.options import plain_names

    conf = cfg.load(Cluster(tmp_path / "c", {IDC: ["m1"]}).config_path)
    hosts = [f"h{n:04d}" for n in range(2500)]
    calls = _revocations(conf, hosts)
    assert all(len(c["ids"]) + len(c["hosts"]) <= 1000 for c in calls) and len(calls) == 5
    assert [h for c in calls for h in c["hosts"]] == hosts and {i for c in calls for i in c["ids"]} == {
        f"agent-{h}" for h in hosts}
    assert plain_names("web01, db01,web01") == ["web01", "db01"]
    for expression in ("web[01-03]", "web*", "~web", "!web01", "web01,&db"):
        assert plain_names(expression) is None


# -- through real masters, the CLI and a real agent --------------------------------------------------------


class Sender:
    """One rpyc connection to one master, every request sealed with `key` (registered there or not)."""

    def __init__(self, cluster: Cluster, master: str, key: Identity) -> None:
        self.master, self.key = master, key
        self.peer = Peer(key, decode_public(cluster.config().masters[master].public_key))
        self.conn = rpyc.connect("127.0.0.1", cluster.ports[master], config={"allow_pickle": False})

    def call(self, op: str, args: dict[str, Any], host: str = "web01") -> dict[str, Any]:
        request = new_request(op, self.master, f"agent:{host}", "agent", args)
        reply: dict[str, Any] = self.peer.open_reply(getattr(self.conn.root, op)(self.peer.seal_request(request)),
                                                     request)
        return reply

    def closed_by_master(self) -> bool:
        """Whether the master closed this connection, seen without sending anything on it (what it sent
        before closing is read and served as rpyc does)."""
        try:
            while self.conn.poll(0):
                pass
        except EOFError:
            return True
        return False

    def close(self) -> None:
        self.conn.close()


def fleet(make_cluster: Callable[..., Cluster], **kw: Any) -> Cluster:
    """IDC local (m1, m2) and IDC far (f1), the CLI key `test` an admin; every master started."""
    cluster = make_cluster({IDC: ["m1", "m2"], "far": ["f1"]}, admins=("test",), **kw)
    for master in ("m1", "m2", "f1"):
        cluster.start(master)
    return cluster


def agents_of(cluster: Cluster, *args: str) -> dict[str, dict[str, Any]]:
    """`ombot audit agents --json`, by host."""
    listed = cluster.ombot("audit", "agents", "--json", *args)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return {a["host"]: a for a in json.loads(listed.stdout)["agents"]}


def bound_at(cluster: Cluster, master: str, host: str, public_key: str) -> dict[str, str]:
    """What the rollout job does on `master` once `host` made its key: masters.enrolment's `bind`, which
    returns the certificate. Here the master is stopped meanwhile and this process opens its database."""
    from ombot.masters import store
    from ombot.masters.enrolment import Signer
    from ombot.masters.registry import ClientRegistry

    conf = cluster.config()
    settings = conf.masters[master]
    cluster.processes[master].stop()
    database = store.open_store(settings.database_url)
    try:
        peers = {m.id: m.public_key for m in conf.masters.values() if m.idc == settings.idc}
        assert settings.key_file is not None
        registry = ClientRegistry(master, {c: conf.clients[c] for c in settings.accept},
                                  Signer(Identity.load(settings.key_file), settings.idc, peers))
        certificate: dict[str, str] = registry.bind(host, public_key, "rollout")
    finally:
        database.close()
    cluster.start(master)
    return certificate


def keygen(key: Path) -> str:
    """`python -m ombot.audit_agent keygen`, as the rollout runs it on the host: the public key."""
    made = subprocess.run([sys.executable, "-m", "ombot.audit_agent", "keygen", "--key", str(key)],
                          capture_output=True, text=True, env=child_env(), timeout=60, check=True)
    return made.stdout.strip()


def stored_at(cluster: Cluster, master: str) -> list[str]:
    """The commands a master stored."""
    with sqlite3.connect(cluster.root / f"state-{master}" / f"{master}.db") as db:
        try:
            return [json.loads(d).get("command") for (d,) in db.execute("SELECT data FROM auditevent ORDER BY at")]
        except sqlite3.OperationalError:
            return []


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_a_fleet_enrolled_pending_binds_keys_made_on_the_hosts(
        tmp_path: Path, make_cluster: Callable[..., Cluster], processes: list[subprocess.Popen[bytes]]) -> None:
    from ombot import __version__
    from ombot.audit_agent.settings import render

    cluster = fleet(make_cluster, limits={"auth_timeout_seconds": 2})
    enrolled = cluster.ombot("audit", "enroll", "web[01-03]", "--idc", IDC)
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    assert "3 host(s) in local: web01, web02, web03" in enrolled.stdout
    assert "m1: 3 enrolled pending" in enrolled.stdout and "m2: 3 enrolled pending" in enrolled.stdout
    listed = agents_of(cluster, "--idc", IDC)
    assert {h: a["state"] for h, a in listed.items()} == {"web01": "pending", "web02": "pending", "web03": "pending"}
    ids = {h: {m: v["enrolment"] for m, v in a["masters"].items()} for h, a in listed.items()}
    assert all(len(set(per.values())) == 1 and set(per) == {"m1", "m2"} for per in ids.values())  # one id, every master
    again = cluster.ombot("audit", "enroll", "web[01-03]", "--idc", IDC)
    assert again.returncode == 0 and "m1: 3 already pending" in again.stdout
    assert {h: {m: v["enrolment"] for m, v in a["masters"].items()} for h, a in agents_of(cluster, "--idc", IDC).items()
            } == ids  # a re-run keeps the enrolment: certificates already out stay good
    assert cluster.ombot("audit", "enroll", "web01", "--idc", "far").returncode == 0

    # The rollout, on m1: web01 makes its key, m1 binds it and signs the certificate the host keeps.
    etc = tmp_path / "web01" / "etc"
    public = keygen(etc / "agent.key")
    certificate = bound_at(cluster, "m1", "web01", public)
    (etc / "agent.binding").write_text(json.dumps(certificate))
    conf = cluster.config()
    masters = [(m, "127.0.0.1", cluster.ports[m], conf.masters[m].public_key) for m in ("m2", "m1")]  # m2 first
    spool_dir, state_dir = tmp_path / "spool", tmp_path / "agent-state"
    subprocess.run([sys.executable, "-m", "ombot.audit_agent", "install", "--root", str(tmp_path / "root")],
                   check=True, env=child_env(), capture_output=True)
    spool_dir.mkdir(mode=0o1733)
    text = render("web01", IDC, "agent.key", masters, str(spool_dir), str(state_dir))
    for key, value in (("scan_seconds", "0.2"), ("heartbeat_seconds", "1"), ("retry_min_seconds", "0.2"),
                       ("retry_max_seconds", "1.0"), ("connect_timeout_seconds", "2")):
        text = "\n".join(f"{key} = {value}" if line.startswith(f"# {key} = ") else line for line in text.split("\n"))
    (etc / "agent.toml").write_text(text)
    write_records(spool_dir, ["echo first-contact"])
    log_path = tmp_path / "agent.log"
    processes.append(subprocess.Popen([sys.executable, "-m", "ombot.audit_agent", "run", "--config", str(etc / "agent.toml")],
                                      stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=child_env(),
                                      start_new_session=True))
    wait_for(lambda: "echo first-contact" in stored_at(cluster, "m2"), why=f"the event at m2:\n{log_path.read_text()}")
    log = log_path.read_text()
    assert "master m2 bound this host's key" in log  # it did not know the key: the certificate bound it
    assert (f"audit agent {__version__} for web01 in local: sources spool {spool_dir}; masters "
            f"m2@127.0.0.1:{cluster.ports['m2']}, m1@127.0.0.1:{cluster.ports['m1']}; ") in log
    wait_for(lambda: (lambda a: (a["version"], a["spool_depth"]))(agents_of(cluster, "--idc", IDC)["web01"])
             == (__version__, 0), why="a heartbeat after the batch")
    web01 = agents_of(cluster, "--idc", IDC)["web01"]
    assert web01["state"] == "bound" and {m: v["state"] for m, v in web01["masters"].items()} == {"m1": "bound",
                                                                                                  "m2": "bound"}
    assert web01["sources"] == ["spool"] and web01["spool_depth"] == 0 and web01["last_seen"] > 0
    pending = cluster.ombot("clients", "list", "--master", "m2").stdout
    assert "agent-web02" in pending and "PENDING (no key yet) enrolled" in pending and "by test" in pending
    table = cluster.ombot("audit", "agents")
    [line] = [line for line in table.stdout.splitlines() if line.startswith("web01  local")]
    assert " bound " in line and " UTC (" in line and " spool " in line and __version__ in line \
        and "m1:bound m2:bound" in line, table.stdout

    # What others can send m2's `bind` (m2 knows web01's key now, and web02 is pending there)
    far_key = Identity.generate()
    far_cert = bound_at(cluster, "f1", "web01", far_key.public)  # another IDC's master, a real certificate
    stranger, thief = Sender(cluster, "m2", far_key), Sender(cluster, "m2", Identity.generate())
    try:
        assert refused(lambda: stranger.call("bind", {"certificate": far_cert})).code == "wrong_idc"
        assert refused(lambda: thief.call("bind", {"certificate": certificate})).code == "wrong_key"
        assert refused(lambda: thief.call("bind", {"certificate": {"statement": "x" * 9000, "signature": ""}})).code \
            == "frame_too_large"
        assert refused(lambda: thief.call("ingest", {"host": "web01", "events": []})).code == "unknown_sender"
        # past auth_timeout_seconds the master closes it: a refused stranger's bind never authenticated it
        wait_for(thief.closed_by_master, within=15, why="the master to close the unauthenticated connection")
        with pytest.raises(EOFError):
            thief.call("bind", {"certificate": certificate})
    finally:
        stranger.close()
        thief.close()

    # Revoked: refused at both masters from the next frame, and no certificate binds it again.
    revoked = cluster.ombot("audit", "revoke", "web[01-03]", "--idc", IDC)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert "m1: agent-web01: revoked" in revoked.stdout and "m2: agent-web02: revoked" in revoked.stdout
    host_key = Identity.load(etc / "agent.key")
    for master in ("m1", "m2"):
        link = Sender(cluster, master, host_key)
        try:
            assert refused(lambda: link.call("ingest", {"host": "web01", "events": []})).code == "revoked"
            assert refused(lambda: link.call("bind", {"certificate": certificate})).code == "revoked"
        finally:
            link.close()
    assert {h: a["state"] for h, a in agents_of(cluster, "--idc", IDC).items()} == {
        "web01": "revoked", "web02": "revoked", "web03": "revoked"}
    anew = cluster.ombot("audit", "enroll", "web01", "--idc", IDC)
    assert anew.returncode == 0 and "m2: enrolled pending" in anew.stdout
    fresh = agents_of(cluster, "--idc", IDC)["web01"]
    assert fresh["state"] == "pending" and fresh["masters"]["m2"]["enrolment"] != ids["web01"]["m2"]
    replay = Sender(cluster, "m2", host_key)
    try:  # the old key and certificate after the host was enrolled anew: still refused
        assert refused(lambda: replay.call("bind", {"certificate": certificate})).code == "revoked"
    finally:
        replay.close()


@pytest.mark.slow
def test_a_thousand_hosts_and_more_go_in_bounded_calls(tmp_path: Path, make_cluster: Callable[..., Cluster]) -> None:
    hosts = [f"h{n:04d}" for n in range(1, 1201)]
    inventory = "[local]\nlocalhost ansible_connection=local\n\n[fleet]\n" + "\n".join(
        f"{h} ansible_connection=local" for h in hosts) + "\n"
    cluster = make_cluster({IDC: ["m1"]}, admins=("test",), inventory=inventory)
    cluster.start("m1")
    enrolled = cluster.ombot("audit", "enroll", "fleet", "--idc", IDC)
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    assert "1200 host(s) in local: h0001, h0002," in enrolled.stdout and "and 1180 more" in enrolled.stdout
    assert "m1: 1200 enrolled pending" in enrolled.stdout and len(enrolled.stdout.splitlines()) < 5
    listed = agents_of(cluster)  # two pages
    assert sorted(listed) == hosts and {a["state"] for a in listed.values()} == {"pending"}
    table = cluster.ombot("audit", "agents").stdout.splitlines()
    assert table[0].split() == ["HOST", "IDC", "STATE", "LAST", "CONTACT", "QUEUE", "SOURCES", "VERSION", "MASTERS"]
    assert table[1].split() == ["h0001", "local", "pending", "never", "-", "-", "-", "m1:pending"]

    revoked = cluster.ombot("audit", "revoke", "fleet", "--idc", IDC)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert "m1: 1200 revoked" in revoked.stdout and len(revoked.stdout.splitlines()) < 5
    mixed = cluster.ombot("audit", "revoke", "h0001,nosuch")  # a host nobody knows: named, exit 1
    assert mixed.returncode == 1 and "m1: agent-h0001: revoked before" in mixed.stdout
    assert "no master knows an audit agent of nosuch: nothing was revoked for it" in mixed.stderr
    assert "taken as host names" in mixed.stdout  # nosuch is in no inventory

    out = tmp_path / "hand"
    hand = cluster.ombot("audit", "enroll", "h[0001-0003]", "--idc", IDC, "--out", str(out))
    assert hand.returncode == 0 and "m1: 3 accepted" in hand.stdout, hand.stdout + hand.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"agent-h000{n}.{s}" for n in (1, 2, 3) for s in ("key", "pub", "toml")]
    assert agents_of(cluster)["h0001"]["state"] == "bound"
    offline = cluster.ombot("audit", "enroll", "h[0001-0003]", "--idc", IDC, "--print-only")
    assert offline.returncode == 2 and "--print-only asks no master" in offline.stderr
    cluster.processes["m1"].stop()
    down = cluster.ombot("audit", "agents")
    assert down.returncode == 4 and "m1: error:" in down.stderr and "its agents are not shown" in down.stderr
