"""Inventories in Ansible's formats and OMBot's target expressions."""

from __future__ import annotations

from pathlib import Path

import pytest

from masters import Refused
from masters.inventory import Inventory, TargetError, expand_ranges

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
