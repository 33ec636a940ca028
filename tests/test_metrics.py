"""Issue 21, metrics: a real master, a real bot on the fake Slack and a real audit agent, scraped over
HTTP at their ops listeners and read with prometheus_client's own parser. Every figure is checked by
its value (a job counted exactly once, the agent's heartbeat as its master's database holds it, a 429
counted), not by its name alone; and every family follows Prometheus' naming conventions."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics_core import Metric

import ombot
from tests.rigs import (
    ALERT_RULES, ALICE, AUDIT_CHANNEL, HOST, ApprovalRig, AuditRig, approval, audit_site, event, ingest, policy, role,
    rule, with_agent_hosts, write_records,
)
from tests.scrape import Samples, families, get, master_ops, samples, value, with_host
from tests.support import Cluster, free_port, wait_for

LEAD = "U0LEAD1"
POLICY = policy(role("ops", ALICE), role("leads", LEAD),
                rule("shell needs a lead", modules=["shell.exec"], request=["ops"], approval=approval()),
                rule("everyday", modules=["echo"], request=["ops"]))
# Every label an OMBot metric may carry: bounded values only (hosts for the per-agent figures alone).
LABELS = {"module", "state", "status", "backend", "outcome", "kind", "host", "method", "reason", "decision", "rule",
          "master", "idc", "version", "mode"}
TIME_WORDS = re.compile(r"(?:^|_)(?:duration|wait|latency|elapsed|age|timestamp|time)(?:_|$)")

# -- the conventions ---------------------------------------------------------------------------------


def convention_problems(found: Iterable[Metric]) -> list[str]:
    """What breaks Prometheus' naming conventions (prometheus.io/docs/practices/naming) in OMBot's families."""
    problems = []
    for family in found:
        name = family.name + "_info" if family.type == "info" else family.name  # as exposed
        if not name.startswith("ombot_"):
            continue  # the client's process_* and python_* figures
        names = {s.name for s in family.samples} or {name + "_total" if family.type == "counter" else name}
        if not re.fullmatch(r"ombot_(master|bot|audit)_[a-z][a-z0-9_]*", name):
            problems.append(f"{name}: not ombot_<master|bot|audit>_<what>")
        if family.type == "counter" and not all(n.endswith("_total") for n in names):
            problems.append(f"{name}: a counter's samples end in _total")
        if family.type != "counter" and any(n.endswith("_total") for n in names):
            problems.append(f"{name}: only counters end in _total")
        if family.type == "histogram" and not name.endswith(("_seconds", "_bytes")):
            problems.append(f"{name}: a histogram without its unit")
        if TIME_WORDS.search(name) and not name.endswith("_seconds"):
            problems.append(f"{name}: a time without its unit (_seconds)")
        if "timestamp" in name and not name.endswith("_timestamp_seconds"):
            problems.append(f"{name}: a point in time ends in _timestamp_seconds")
        if not family.documentation:
            problems.append(f"{name}: no help text")
        labels = {label for s in family.samples for label in s.labels} - {"le"}
        if labels - LABELS:
            problems.append(f"{name}: unbounded or unknown labels {sorted(labels - LABELS)}")
    return problems


def test_the_naming_check_finds_what_breaks_the_conventions() -> None:
    bad = [Metric("ombot_bot_wait", "no unit", "histogram"), Metric("ombot_master_sent_total", "a gauge", "gauge"),
           Metric("ombot_audit_last_timestamp", "", "gauge"), Metric("ombot_thing", "no room", "gauge")]
    bad[1].add_sample("ombot_master_sent_total", {"user": "U1"}, 1)
    assert convention_problems(bad) == [
        "ombot_bot_wait: a histogram without its unit", "ombot_bot_wait: a time without its unit (_seconds)",
        "ombot_master_sent_total: only counters end in _total",
        "ombot_master_sent_total: unbounded or unknown labels ['user']",
        "ombot_audit_last_timestamp: a time without its unit (_seconds)",
        "ombot_audit_last_timestamp: a point in time ends in _timestamp_seconds",
        "ombot_audit_last_timestamp: no help text", "ombot_thing: not ombot_<master|bot|audit>_<what>"]


def test_every_metric_defined_follows_the_conventions() -> None:
    from prometheus_client import REGISTRY

    from ombot.audit import metrics as audit_metrics  # noqa: F401  (each defines its metrics on import)
    from ombot.bot import metrics as bot_metrics  # noqa: F401
    from ombot.masters import metrics as master_metrics  # noqa: F401

    defined = [f for f in REGISTRY.collect() if f.name.startswith("ombot_")]
    assert len(defined) >= 12
    assert convention_problems(defined) == []


# -- the whole site, scraped -------------------------------------------------------------------------


class OpsRig(AuditRig, ApprovalRig):
    """A site whose bot pulls the audit and asks for approvals, its master and bot each with an ops listener."""


@pytest.fixture
def site(make_slack_rig: Callable[..., OpsRig]) -> tuple[OpsRig, int, int]:
    master_port, bot_port = free_port(), free_port()
    options = audit_site(ALERT_RULES)

    def prepare(cluster: Cluster) -> None:
        with_agent_hosts(cluster)
        master_ops(cluster, "m1", master_port)

    options["prepare"] = prepare
    rig = make_slack_rig({"local": ["m1"]}, kind=OpsRig, policy=POLICY, ops_listen=f"127.0.0.1:{bot_port}", **options)
    return rig, master_port, bot_port


@pytest.mark.slow
def test_a_job_an_approval_and_an_agent_show_in_the_metrics(site: tuple[OpsRig, int, int]) -> None:
    rig, master_port, bot_port = site
    master_before, bot_before = samples(master_port), samples(bot_port)

    # audit batches straight from web01's key: two new events, then one again and one malformed
    assert ingest(rig.cluster, "m1", [event(1), event(2)])["stored"] == 2
    assert len(ingest(rig.cluster, "m1", [event(1), {"id": "nonsense"}])["rejected"]) == 1

    rig.fake.rate_limit("chat.postMessage", times=1, retry_after=1)  # the job's card meets one 429
    number = rig.command("echo localhost message=counted").number("Starting job #")
    assert "ok" in rig.final_card(number)["text"]

    pending = rig.ask('shell.exec localhost cmd="echo approved"')
    rig.approve(pending, LEAD).wait("its job starts now")
    assert "ok" in rig.final_card(pending.asked.number("Starting job #"))["text"]

    agent = rig.agent(["m1"])
    write_records(rig.spool_dir, ["echo ALARM from the agent"])
    rig.fake.wait_for(lambda: rig.alerts("alarm", AUDIT_CHANNEL), what="the agent's alert", timeout=45)
    wait_for(lambda: rig.master_rows("m1", "SELECT host FROM auditagent"), why="the agent's heartbeat")
    agent.stop()  # its last heartbeat stays put: the master's figures can be compared with its database

    master, bot = samples(master_port), samples(bot_port)

    def grew(found: Samples, before: Samples, name: str, **labels: str) -> float:
        return value(found, name, **labels) - value(before, name, **labels)

    for state in ("queued", "running", "ok"):  # one echo job, seen entering each state once
        assert grew(master, master_before, "ombot_master_jobs_total", module="echo", state=state) == 1
    assert grew(master, master_before, "ombot_master_jobs_total", module="shell.exec", state="ok") == 1
    assert grew(master, master_before, "ombot_master_job_duration_seconds_count", module="echo") == 1
    assert grew(master, master_before, "ombot_master_host_results_total", module="echo", status="ok") == 1
    assert grew(master, master_before, "ombot_master_backend_runs_total", backend="local", outcome="completed") == 2
    assert grew(master, master_before, "ombot_master_audit_events_total", outcome="deduped") == 1
    assert grew(master, master_before, "ombot_master_audit_events_total", outcome="dropped") == 1
    assert grew(master, master_before, "ombot_master_audit_events_total", outcome="ingested") >= 3  # 2 + the agent's
    assert value(master, "ombot_master_agents", state="accepted") == 2  # web01's and web02's keys
    assert value(master, "ombot_master_connections", kind="chat") >= 1  # the bot's feed keeps one open
    assert value(master, "ombot_master_jobs_active", state="running") == 0

    [(last_seen, depth, dropped)] = rig.master_rows("m1", "SELECT last_seen, spool_depth, dropped_total FROM "
                                                          "auditagent WHERE host = ?", HOST)
    assert with_host(master, "ombot_master_agent_last_heartbeat_timestamp_seconds") == {HOST: last_seen / 1000}
    assert with_host(master, "ombot_master_agent_queued_events") == {HOST: depth}
    assert with_host(master, "ombot_master_agent_dropped_events_total") == {HOST: dropped}

    assert grew(bot, bot_before, "ombot_bot_jobs_submitted_total", module="echo", outcome="accepted") == 1
    assert grew(bot, bot_before, "ombot_bot_jobs_submitted_total", module="shell.exec", outcome="accepted") == 1
    assert grew(bot, bot_before, "ombot_bot_approval_wait_seconds_count", decision="approved") == 1
    assert grew(bot, bot_before, "ombot_bot_approval_wait_seconds_sum", decision="approved") > 0
    assert grew(bot, bot_before, "ombot_bot_slack_rate_limited_total", method="chat.postMessage") == 1
    assert grew(bot, bot_before, "ombot_bot_slack_retries_total", reason="rate_limited") == 1
    posts = len(rig.fake.calls_to("chat.postMessage"))  # what the fake answered ok, every one counted
    assert value(bot, "ombot_bot_slack_api_calls_total", method="chat.postMessage", outcome="ok") == posts
    assert grew(bot, bot_before, "ombot_audit_alerts_total", rule="alarm") == 1
    assert grew(bot, bot_before, "ombot_audit_feed_events_total", outcome="stored") == len(rig.stored()) >= 3
    assert ("ombot_audit_alert_queue_depth", frozenset()) in bot
    assert value(bot, "ombot_bot_info", mode="http", version=ombot.__version__) == 1

    scraped = families(master_port) + families(bot_port)
    assert convention_problems(scraped) == []
    assert unknown_in_alert_rules(scraped) == set()


ALERT_RULES_FILE = Path(__file__).resolve().parents[1] / "examples" / "prometheus" / "ombot-alerts.yml"


def unknown_in_alert_rules(scraped: list[Metric]) -> set[str]:
    """The OMBot metric names examples/prometheus/ombot-alerts.yml uses that the processes do not serve."""
    served = {sample.name for family in scraped for sample in family.samples}
    served |= {family.name + ("_total" if family.type == "counter" else "") for family in scraped}
    rules = yaml.safe_load(ALERT_RULES_FILE.read_text())["groups"][0]["rules"]
    used = {name for rule in rules for name in re.findall(r"\bombot_[a-z_]+", rule["expr"])}
    assert len(used) >= 10
    return used - served


def test_the_alert_rules_check_finds_a_metric_nobody_serves() -> None:
    assert unknown_in_alert_rules([]) >= {"ombot_master_jobs_total", "ombot_audit_alert_queue_depth"}


@pytest.mark.slow
def test_the_listeners_answer_health_readiness_and_openmetrics(site: tuple[OpsRig, int, int]) -> None:
    rig, master_port, bot_port = site
    for port, checks in ((master_port, {"database", "listener"}), (bot_port, {"database", "masters", "slack"})):
        assert get(port, "/healthz")[::2] == (200, "ok\n")
        status, headers, body = get(port, "/readyz")
        assert status == 200 and headers["Content-Type"] == "application/json", body
        answer = json.loads(body)
        assert answer["ready"] is True and set(answer["checks"]) == checks
        assert all(check["ok"] for check in answer["checks"].values()), answer
        status, headers, body = get(port, "/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.endswith("# EOF\n") and "ombot_" in body
        assert get(port, "/nope")[0] == 404
