"""Inventories in Ansible's formats and OMBot's target expressions."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from ombot.masters import Refused
from ombot.masters.inventory import Inventory, MinionInventory, TargetError, expand_ranges, open_inventory
from ombot.config import Limits, MasterSettings, SaltSettings
from tests.support import SteppedClock

YAML = """\
all:
  children:
    web:
      hosts:
        web01: {ansible_connection: local}
        web02: {ansible_connection: local}
        web10: {ansible_connection: local}
    db:
      hosts:
        db01:
"""


@pytest.fixture(params=["ini", "yaml"])
def inventory(request, tmp_path: Path) -> Inventory:
    if request.param == "ini":
        text = "[web]\nweb01 ansible_connection=local\nweb02 ansible_connection=local\nweb10 ansible_connection=local\n[db]\ndb01\n"
        path = tmp_path / "hosts.ini"
    else:
        text, path = YAML, tmp_path / "hosts.yml"
    path.write_text(text)
    return Inventory(path)


def test_ranges_keep_padding_and_are_inclusive() -> None:
    assert expand_ranges("web[01-03]") == ["web01", "web02", "web03"]
    assert expand_ranges("web[8-10].bj") == ["web8.bj", "web9.bj", "web10.bj"]
    assert expand_ranges("a[098-100], b") == ["a098", "a099", "a100", "b"]
    with pytest.raises(TargetError, match="backwards"):
        expand_ranges("web[05-01]")
    with pytest.raises(TargetError, match="Ansible subscripts"):
        expand_ranges("web[0:2]")
    with pytest.raises(TargetError, match="Ansible subscripts"):
        expand_ranges("web[1]")
    with pytest.raises(TargetError, match="not a host name"):
        expand_ranges("web;reboot")
    with pytest.raises(TargetError, match="no targets"):
        expand_ranges(" , ")


def test_names_groups_patterns_and_order(inventory: Inventory) -> None:
    assert inventory.expand("web") == ["web01", "web02", "web10"]
    assert inventory.expand("db01,web[01-02]") == ["db01", "web01", "web02"]
    assert inventory.expand("web,!web02") == ["web01", "web10"]
    assert inventory.expand("web*") == ["web01", "web02", "web10"]
    assert inventory.host_vars("web01")["ansible_connection"] == "local"


def test_a_term_matching_nothing_is_an_error(inventory: Inventory) -> None:
    with pytest.raises(TargetError, match="'web03'"):
        inventory.expand("web[01-03]")  # a range is not a wildcard: every name must exist
    with pytest.raises(TargetError, match="'nosuch'"):
        inventory.expand("web01,nosuch")


def test_a_broken_inventory_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("all: [unclosed\n")
    with pytest.raises(TargetError, match="inventory"):
        Inventory(bad)
    with pytest.raises(TargetError, match="does not exist"):
        Inventory(tmp_path / "missing.ini")


def test_master_runs_exactly_the_listed_hosts_and_refuses_vanished_ones(cluster, router) -> None:
    hosts = router.expand("local", "web[01-02]")
    assert hosts == ["web01", "web02"]
    ref, _ = router.submit("local", "echo", {"message": "x"}, hosts)
    events: list[dict] = []
    assert router.follow(ref, events.append) == "ok"
    assert sorted(e["data"]["host"] for e in events if e["kind"] == "host") == hosts
    # web02 leaves the inventory; after a restart the master refuses a job still listing it.
    inv = cluster.root / "inventory.ini"
    inv.write_text(inv.read_text().replace("web02 ansible_connection=local\n", ""))
    cluster.processes["m1"].stop()
    cluster.start("m1")
    with pytest.raises(Refused) as refused:
        cluster.router().submit("local", "echo", {"message": "x"}, hosts)
    assert refused.value.code == "unknown_host" and "web02" in refused.value.message


def test_regex_terms_are_matched_with_re2_and_keep_ansibles_operators(inventory: Inventory) -> None:
    assert expand_ranges("~web0[1-2],!~db") == ["~web0[1-2]", "!~db"]  # a regex is never range-expanded
    assert inventory.expand("~web0[12]") == ["web01", "web02"]
    assert inventory.expand("~w.*,!~web0[12]") == ["web10"]
    assert inventory.expand("web,&~.*[02]$") == ["web02", "web10"]
    assert inventory.expand("!~web") == ["db01"]  # only `!` terms: taken from all hosts, as in Ansible
    assert inventory.expand("~d.") == ["db01"]  # matches the group db (and its host)
    with pytest.raises(TargetError, match="RE2 syntax"):
        inventory.expand(r"~(w)\1")
    with pytest.raises(TargetError, match="too complex"):
        inventory.expand("~(.*){1000}Z")
    with pytest.raises(TargetError, match="not valid Unicode"):
        inventory.expand("~web\ud800")


def test_expansion_is_bounded() -> None:
    with pytest.raises(TargetError, match="at most 9 digits"):
        expand_ranges("web[" + "0" * 20 + "1-2]")
    with pytest.raises(TargetError, match="the cap is 255"):
        expand_ranges("w" * 256)
    with pytest.raises(TargetError, match="101 target terms"):
        expand_ranges(",".join(["web01"] * 101))
    with pytest.raises(TargetError, match="the cap is 4096"):
        expand_ranges("web01 " * 700)


def test_expansion_limits_are_inclusive_and_refusals_are_whole_sentences() -> None:
    assert len(expand_ranges("w" * 255)) == 1 and len(expand_ranges("w " * 100)) == 100
    assert expand_ranges("a[000000001-000000002]") == ["a000000001", "a000000002"]
    assert expand_ranges("a[1-1]") == ["a1"]
    assert len(expand_ranges("a[00001-10000]")) == 10_000 and expand_ranges("a[9998-9999]") == ["a9998", "a9999"]
    assert expand_ranges("a[08-100]")[:3] == ["a08", "a09", "a10"]  # a leading zero pads to the start's width
    longest = " " + ",".join(["w" * 255] * 16)
    assert len(longest) == 4096 and expand_ranges(longest) == ["w" * 255] * 16
    refusals = {
        "": "no targets given",
        " , ": "no targets given",
        "~": "'~': a ~ term needs a regular expression after the ~",
        "!~": "'!~': a ~ term needs a regular expression after the ~",
        "web[0:2]": "'web[0:2]': OMBot ranges are name[NN-MM] (e.g. web[01-03]); Ansible subscripts such as "
                    "group[0:2] are not supported, because the two read the same text differently",
        "web;reboot": "'web;reboot' is not a host name, group or pattern",
        "web[05-01]": "range 'web[05-01]' runs backwards",
        "a[0-10000]": "range 'a[0-10000]' is larger than 10000 hosts",
        "a[1-10000],b": "targets expand to more than 10000 names",
        "w" * 256: f"target term {'w' * 40!r}... is 256 characters long; the cap is 255",
        "w" * 4097: "the target expression is 4097 characters long; the cap is 4096",
        ",".join(["w"] * 101): "101 target terms; the cap is 100 (a range such as web[01-40] is one term)",
        "web[" + "0" * 60 + "1-2]": f"range {'web[' + '0' * 56!r}: a range bound has at most 9 digits",
        "a[0000000001-2]": "range 'a[0000000001-2]': a range bound has at most 9 digits",
    }
    for targets, message in refusals.items():
        assert refusal_of(targets) == message, targets


def refusal_of(targets: str) -> str:
    with pytest.raises(TargetError) as caught:
        expand_ranges(targets)
    return str(caught.value)


def test_the_inventory_lists_its_hosts_and_nothing_it_invents(inventory: Inventory, tmp_path: Path) -> None:
    assert inventory.path.parent == tmp_path and inventory.path.name.startswith("hosts.")
    assert inventory.hosts() == ["web01", "web02", "web10", "db01"]
    assert inventory.groups() == ["all", "db", "ungrouped", "web"]
    assert inventory.missing(["web01", "gone", "db01", "web03"]) == ["gone", "web03"]
    assert inventory.host_vars("nosuch") == {}
    # Ansible makes up an implicit `localhost` for any inventory; a target must be a listed host.
    for implicit in ("localhost", "127.0.0.1"):
        with pytest.raises(TargetError) as caught:
            inventory.expand(implicit)
        assert str(caught.value) == f"no host or group matches {implicit!r}"
    with pytest.raises(TargetError) as caught:
        inventory.expand("web,&db")
    assert str(caught.value) == "'web,&db' selects no hosts"


def test_regexes_are_re2s_never_pythons(inventory: Inventory, capfd: pytest.CaptureFixture[str]) -> None:
    # \pL (a Unicode letter) is RE2 syntax that Python's re refuses: only re2 can give this answer.
    assert inventory.expand(r"~\pL+01") == ["web01", "db01"]
    with pytest.raises(TargetError) as caught:
        inventory.expand(r"~(w)\1")
    assert str(caught.value) == (r"'~(w)\\1' is not a regular expression OMBot can run (invalid escape sequence: \1); "
                                 "target regexes use RE2 syntax, without backreferences or lookarounds")
    assert capfd.readouterr().err == ""  # re2 logs nothing of a refused pattern to the master's stderr
    assert inventory.expand("web,!~a{1000}b{996}") == ["web01", "web02", "web10"]  # 2000 RE2 instructions: the cap
    with pytest.raises(TargetError) as caught:
        inventory.expand("~a{1000}b{997}")
    assert str(caught.value) == ("'~a{1000}b{997}': the regular expression is too complex (RE2 program of 2001 "
                                 "instructions, the cap is 2000)")


def test_regex_matching_stops_past_its_deadline(inventory: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    from ombot.masters import inventory as module

    monkeypatch.setattr(module, "time", SteppedClock(then=module.EXPAND_SECONDS))
    assert inventory.expand("~web") == ["web01", "web02", "web10"]  # at the deadline: still in time
    monkeypatch.setattr(module, "time", SteppedClock(then=module.EXPAND_SECONDS + 0.001))
    with pytest.raises(TargetError) as caught:
        inventory.expand("~web")
    assert str(caught.value) == ("expanding the targets took over 1 s (stopped at '~web'); "
                                 "use fewer terms or simpler patterns")
    # Late while going through the hosts, after every group was in time.
    monkeypatch.setattr(module, "time", SteppedClock(then=module.EXPAND_SECONDS + 0.001,
                                                     on_time=len(inventory.groups())))
    with pytest.raises(TargetError) as caught:
        inventory.expand("~db")
    assert str(caught.value) == ("expanding the targets took over 1 s (stopped at '~db'); "
                                 "use fewer terms or simpler patterns")


def test_the_work_of_an_expansion_is_counted_before_matching(inventory: Inventory,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """As Ansible resolves a term: a host's own name costs nothing; anything else costs a fixed part
    plus one comparison per group (4 here), and one per host too (4) unless it is a group's plain name."""
    from ombot.masters import inventory as module

    targets = "web,db,web0*,!nosuch,&~w,db01"  # 500+4 twice, 500+4+4 three times, and 0: 2,532
    monkeypatch.setattr(module, "MAX_NAME_MATCHES", 2532)
    assert inventory.expand(targets) == ["web01", "web02", "web10"]  # at the cap: allowed
    monkeypatch.setattr(module, "MAX_NAME_MATCHES", 2531)
    with pytest.raises(TargetError) as caught:
        inventory.expand(targets)
    assert str(caught.value) == ("5 target terms are patterns or names that are not hosts; matching them against "
                                 "the inventory's 4 groups and 4 hosts would cost about 2,532 name comparisons, "
                                 "over the cap of 2,531: name hosts, or use fewer patterns")
    monkeypatch.setattr(module, "MAX_NAME_MATCHES", 0)
    assert inventory.expand("web01,db01") == ["web01", "db01"]  # hosts by name: no work at all


def test_plain_terms_stop_at_the_deadline_too(inventory: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    from ombot.masters import inventory as module

    monkeypatch.setattr(module, "time", SteppedClock(then=module.EXPAND_SECONDS))
    assert inventory.expand("db") == ["db01"]  # at the deadline: still in time
    monkeypatch.setattr(module, "time", SteppedClock(then=module.EXPAND_SECONDS + 0.001, on_time=1))
    with pytest.raises(TargetError) as caught:
        inventory.expand("web01,db")
    assert str(caught.value) == ("expanding the targets took over 1 s (stopped at 'db'); "
                                 "use fewer terms or simpler patterns")


def test_the_minion_inventory_follows_the_accepted_keys(tmp_path: Path) -> None:
    """Every accepted minion in the group `minions`, read again whenever the keys change; ids a
    target expression or an INI file could not carry exactly are left out."""
    accepted = ["web01", "db_1", "_x", "a" * 255, "a" * 256, "-web", ".hidden", "bad id", "web02.example-x"]
    path = tmp_path / "var" / "state" / "salt-minions.ini"  # its directories do not exist yet
    minions = MinionInventory(path, lambda: list(accepted))
    valid = ["web01", "db_1", "_x", "a" * 255, "web02.example-x"]
    assert minions.path == path and minions.hosts() == valid and minions.groups() == ["all", "minions", "ungrouped"]
    assert path.read_text() == "[minions]\n" + "".join(f"{name}\n" for name in valid)
    assert [p.name for p in path.parent.iterdir()] == ["salt-minions.ini"]  # written whole, nothing left beside
    assert minions.expand("minions") == valid and minions.expand("web01") == ["web01"]
    assert minions.missing(["web01", "web03"]) == ["web03"]

    accepted[:] = ["web01", "web03"]  # web03 accepted, the others' keys deleted: no restart
    assert minions.expand("web03") == ["web03"]
    with pytest.raises(TargetError) as caught:
        minions.expand("db_1")
    assert str(caught.value) == "no host or group matches 'db_1'"
    accepted.append("web04")
    assert minions.missing(["web01", "web04", "db_1"]) == ["db_1"]
    accepted.append("web05")
    assert minions.hosts() == ["web01", "web03", "web04", "web05"]
    assert path.read_text() == "[minions]\nweb01\nweb03\nweb04\nweb05\n"
    # A second master process on the same state directory starts from what the keys say now.
    assert MinionInventory(path, lambda: ["db01"]).hosts() == ["db01"]


def test_a_master_opens_its_inventory_file_or_the_minion_keys(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from ombot.masters import backends

    hosts = tmp_path / "hosts.ini"
    hosts.write_text("[web]\nweb01\n")
    settings = MasterSettings(id="m1", idc="bj", host="127.0.0.1", port=1, public_key="", key_file=None,
                              inventory=hosts, backend="local", accept=(), state_dir=tmp_path / "state" / "m1",
                              database_url="sqlite://", limits=Limits())
    from_file = open_inventory(settings)
    assert type(from_file) is Inventory and from_file.path == hosts and from_file.hosts() == ["web01"]
    assert open_inventory(replace(settings, inventory=None)) is None
    # The real salt-master's keys are tests/test_salt.py's: here a stand-in for masters.backends.salt.
    asked: list[Path] = []
    keys = ["minion1", "minion2"]
    monkeypatch.setattr(backends, "salt_module", lambda: SimpleNamespace(
        accepted_minions=lambda config: asked.append(config) or list(keys)))
    salt = SaltSettings(config=tmp_path / "salt" / "master", inventory="minions")
    minions = open_inventory(replace(settings, inventory=None, salt=salt))
    assert isinstance(minions, MinionInventory) and minions.path == tmp_path / "state" / "m1" / "salt-minions.ini"
    assert minions.hosts() == ["minion1", "minion2"] and set(asked) == {salt.config}
    keys.append("minion3")
    assert minions.expand("minion3") == ["minion3"]
