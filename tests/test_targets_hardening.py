"""Target expressions and request text that used to freeze the master or crash it into `internal`.

A `~REGEX` term ran in Python's backtracking `re` holding the GIL, so one chat message froze the
whole master; huge ranges, `"v": true` and lone surrogates ended in tracebacks. Each test drives a
real master (raw frames, as in test_attacks) or the real `ombot bot` process.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ombot.masters import Router
from ombot.masters.inventory import EXPAND_SECONDS
from ombot.envelope import Refused, Request, new_request
from tests.fakeslack import post_to_bot, slash_command_body, view_submission_body
from tests.rigs import SECRET, policy, role, rule, slack_rig
from tests.attacker import Attacker, echo_args
from tests.support import INVENTORY, Cluster, SteppedClock

# A long name makes backtracking regexes take effectively forever under `re`.
LONG_HOST = "a-rather-long-host-name-for-backtracking-attacks.example.internal"
SLOW_REGEXES = ["~(((.*)*)*)*Z", "~(.*){25}Z"]
ANSWER_SECONDS = 10  # generous: the fix answers in well under a second; the old master never did


class Sender(Attacker):
    """The attack suites' raw-frame sender (tests/attacker.py), asking as the identity its client key stands for."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster)
        self.requester = f"cli:{cluster.config().require_client().id}"

    def request(self, op: str = "submit", args: dict[str, Any] | None = None, to: str = "m1",
                **kw: Any) -> Request:
        return new_request(op, to, self.requester, "cli", echo_args() if args is None and op == "submit" else args or {},
                           **kw)


@pytest.fixture(scope="module")
def shared(make_module_cluster: Callable[..., Cluster]) -> Cluster:
    cluster = make_module_cluster(inventory=INVENTORY + f"\n[long]\n{LONG_HOST} ansible_connection=local\n")
    cluster.start("m1")
    return cluster


@pytest.fixture(scope="module")
def router(shared: Cluster) -> Iterator[Router]:
    with contextlib.closing(shared.router()) as r:
        yield r


@pytest.fixture
def attacker(shared: Cluster) -> Iterator[Attacker]:
    with contextlib.closing(Sender(shared)) as a:
        yield a


def in_thread(work: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run work() in a daemon thread; its result or exception lands in the dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test to assert on
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def refusal(attacker: Attacker, request: Request, **changes: Any) -> Refused:
    """Send the request's payload with `changes` applied (JSON-escaped, so lone surrogates travel)."""
    payload = {**request.payload(), **changes}
    reply = attacker.send(request.op, attacker.seal_message(json.dumps(payload).encode()))
    with pytest.raises(Refused) as info:
        attacker.peer.open_reply(reply, request)
    return info.value


def no_traceback(cluster: Cluster) -> None:
    log = cluster.processes["m1"].log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def job_count(cluster: Cluster, job_id: str) -> int:
    path = cluster.config().masters["m1"].database_url.split("///", 1)[1]
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT COUNT(*) FROM job WHERE id = ?", (job_id,)).fetchone()[0]


# -- regexes --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("targets", SLOW_REGEXES)
def test_backtracking_regex_is_answered_at_once_and_others_are_served_meanwhile(
        shared: Cluster, router: Router, targets: str) -> None:
    heavy = Sender(shared)
    other = Sender(shared)
    try:
        request = heavy.request("expand", {"targets": targets})
        expanding, expanded = in_thread(lambda: heavy.peer.open_reply(heavy.send("expand", heavy.seal(request)), request))
        health = other.request("health", {})
        checking, checked = in_thread(lambda: other.accepted(health))
        checking.join(ANSWER_SECONDS)
        assert not checking.is_alive(), "the master stopped answering health while a regex ran"
        assert checked.get("result", {}).get("master") == "m1", checked
        expanding.join(ANSWER_SECONDS)
        assert not expanding.is_alive(), f"no answer to {targets!r}"
        # No inventory name holds a "Z": a clear refusal, never a hang or a crash.
        assert isinstance(expanded.get("error"), Refused), expanded
        assert expanded["error"].code == "bad_targets" and "no host or group matches" in expanded["error"].message
        assert router.expand("local", "web01") == ["web01"]
        no_traceback(shared)
    finally:
        heavy.close()
        other.close()


def test_regex_terms_select_as_in_ansible(router: Router) -> None:
    assert router.expand("local", "~web0[12]") == ["web01", "web02"]
    assert router.expand("local", "~web0[1-3]") == ["web01", "web02", "web03"]  # a class, not an OMBot range
    assert router.expand("local", "web,!~web0[13]") == ["web02"]
    assert router.expand("local", "web,&~.*0[23]") == ["web02", "web03"]
    assert router.expand("local", "~(web|db)01") == ["web01", "db01"]
    assert router.expand("local", "~d.") == ["db01"]  # the group db, by regex
    assert router.expand("local", "~a-rather.*:?") == [LONG_HOST]  # a ":" no longer splits the term


@pytest.mark.parametrize(("targets", "says"), [
    (r"~(web)\1", "RE2 syntax"),  # backreference
    ("~(?=web)web01", "RE2 syntax"),  # lookahead
    ("~(.*){1000}Z", "too complex"),
    ("~", "needs a regular expression"),
])
def test_a_regex_re2_cannot_run_is_refused(shared: Cluster, router: Router, targets: str, says: str) -> None:
    with pytest.raises(Refused) as refused:
        router.expand("local", targets)
    assert refused.value.code == "bad_targets" and says in refused.value.message
    no_traceback(shared)


# -- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("targets", "says"), [
    ("web[" + "0" * 4999 + "1-2]", "characters long"),  # int() of >4300 digits raised ValueError
    ("web[" + "1" * 20 + "-" + "1" * 20 + "2]", "at most 9 digits"),
    ("x" * 300, "characters long"),
    (",".join(["web01"] * 101), "101 target terms"),
    ("web[1-2]," * 600, "characters long"),
])
def test_oversized_expressions_get_a_clear_refusal(shared: Cluster, router: Router, targets: str, says: str) -> None:
    with pytest.raises(Refused) as refused:
        router.expand("local", targets)
    assert refused.value.code == "bad_targets" and says in refused.value.message, refused.value.message
    assert router.expand("local", "web[01-02]") == ["web01", "web02"]
    no_traceback(shared)


# -- the work of an expansion ---------------------------------------------------------------------

FLEET_SIZE = 2000
# 42 characters within every size cap, but 9999 glob terms, each compared with all 2000 host names:
# seconds of work under the inventory's lock, so everyone else's expansions waited behind it.
COSTLY = "host00001.example.internal,!x*[0000-9998]"


def fleet_host(n: int) -> str:
    return f"host{n:05d}.example.internal"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    hosts = "".join(f"{fleet_host(n)} ansible_connection=local\n" for n in range(FLEET_SIZE))
    cluster = Cluster(tmp_path_factory.mktemp("fleet"), {"local": ["m1"]}, inventory=f"[fleet]\n{hosts}")
    cluster.start("m1")
    yield cluster
    cluster.stop_all()


@pytest.mark.slow
def test_an_expansion_too_costly_for_the_inventory_is_refused_at_once(fleet: Cluster) -> None:
    heavy, other = fleet.router(), fleet.router()
    try:
        def attack() -> list[tuple[float, BaseException | None]]:
            answers: list[tuple[float, BaseException | None]] = []
            for _ in range(5):
                started = time.monotonic()
                try:
                    heavy.expand("local", COSTLY)
                    answers.append((time.monotonic() - started, None))
                except Refused as exc:
                    answers.append((time.monotonic() - started, exc))
            return answers

        attacking, attacked = in_thread(attack)
        served = 0
        while attacking.is_alive() or served < 3:  # another client, all the while
            started = time.monotonic()
            assert [m["master"] for m in other.health()] == ["m1"]
            assert other.expand("local", f"{fleet_host(7)},{fleet_host(1999)}") == [fleet_host(7), fleet_host(1999)]
            # bounded, not a figure: a loaded machine may stall a round; the old master never answered
            assert time.monotonic() - started < ANSWER_SECONDS, "another client waited behind the expansion"
            served += 1
        attacking.join(ANSWER_SECONDS)
        assert not attacking.is_alive() and "result" in attacked, attacked
        for took, refused in attacked["result"]:
            assert isinstance(refused, Refused) and refused.code == "bad_targets", refused
            assert refused.message.startswith("9999 target terms are patterns or names that are not hosts; matching "
                                              "them against the inventory's 3 groups and 2000 hosts"), refused.message
            assert "over the cap of 1,500,000" in refused.message, refused.message
            assert took < ANSWER_SECONDS, f"the refusal took {took:.1f} s"  # the cap (its message), not a wait
        # What names hosts, however many, costs no matching and still expands.
        everyone = other.expand("local", f"host[00000-{FLEET_SIZE - 1:05d}].example.internal")
        assert everyone == [fleet_host(n) for n in range(FLEET_SIZE)]
        no_traceback(fleet)
    finally:
        heavy.close()
        other.close()


def test_every_term_of_an_expansion_counts_against_its_deadline(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The backstop behind the work cap (lifted here): plain and glob terms stop at the deadline too."""
    from ombot.masters import inventory as module

    (tmp_path / "inventory.ini").write_text(INVENTORY)
    inventory = module.Inventory(tmp_path / "inventory.ini")
    monkeypatch.setattr(module, "MAX_NAME_MATCHES", 10**12)
    monkeypatch.setattr(module, "time", SteppedClock(then=module.EXPAND_SECONDS + 0.001, on_time=3))
    with pytest.raises(module.TargetError) as caught:
        inventory.expand("web01,!x*[0-9]")  # in time for web01, !x*0 and !x*1
    assert str(caught.value) == ("expanding the targets took over 1 s (stopped at '!x*2'); "
                                 "use fewer terms or simpler patterns")


# -- the envelope ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [True, 1.0])
def test_the_version_must_be_the_integer_1(shared: Cluster, attacker: Attacker, version: Any) -> None:
    request = attacker.request("submit")
    refused = refusal(attacker, request, v=version)
    assert refused.code == "bad_request" and "version" in refused.message
    assert job_count(shared, request.id) == 0
    assert attacker.accepted(attacker.request("health"))["master"] == "m1"
    no_traceback(shared)


@pytest.mark.parametrize("where", ["params", "requester", "key", "targets"])
def test_a_lone_surrogate_anywhere_is_refused(shared: Cluster, attacker: Attacker, where: str) -> None:
    bad = "x\ud800y"
    if where == "params":
        request = attacker.request("submit", echo_args(bad))
    elif where == "key":
        request = attacker.request("submit", echo_args(params={"message": "hi", bad: "x"}))
    elif where == "targets":
        request = attacker.request("expand", {"targets": "~web" + bad})
    else:
        request = attacker.request("submit")
    refused = refusal(attacker, request, **({"requester": bad} if where == "requester" else {}))
    assert refused.code == "bad_request" and "not valid Unicode" in refused.message
    assert job_count(shared, request.id) == 0
    assert attacker.accepted(attacker.request("submit"))["duplicate"] is False  # the master still serves
    no_traceback(shared)


# -- the bot: no role, no expansion ---------------------------------------------------------------

ONE_ROLE_POLICY = policy(role("ops", "U0ALICE"), rule("ops may ping", modules=["ping"], request=["ops"]))


@pytest.mark.slow
def test_a_user_without_a_role_is_refused_before_any_expansion(tmp_path: Path) -> None:
    """The master is never started: a refusal that needs no master proves no expand was sent."""
    with slack_rig(tmp_path / "bot", policy=ONE_ROLE_POLICY, start=()) as rig:
        fake, port = rig.fake, rig.port

        def answer(text: str, user: str) -> str:
            url = fake.new_response_url()
            body = slash_command_body(text=text, user_id=user, response_url=url)
            assert post(port, body) == (200, "")
            token = url.rsplit("/", 1)[1]
            posts = fake.wait_for(lambda: [c for c in fake.response_posts if c.path.endswith(token)],
                                  what=f"an answer to {text!r}")
            return json.dumps(posts[0].body)

        refused = answer("ping ~(((.*)*)*)*Z", "U0MALLORY")
        assert "Refused: you hold no role that the access policy lets request jobs" in refused
        # The same path for someone with a role does try the master, which is down:
        assert "Cannot reach the masters" in answer("ping ~web0[12]", "U0ALICE")

        form = view_submission_body("om_run", {"targets": {"v": "~(.*){25}Z"}}, user_id="U0MALLORY",
                                    private_metadata=json.dumps({"idc": "local", "module": "ping",
                                                                 "channel": "C0OPS"}))
        status, reply = post(port, form)
        assert status == 200
        assert "you hold no role" in json.loads(reply)["errors"]["targets"]
        fake.assert_no_violations()


def post(port: int, body: str) -> tuple[int, str]:
    return post_to_bot(port, body, SECRET)
