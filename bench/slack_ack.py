"""Slash-command ack latency: OMBot's real HTTP server next to a bare Bolt app that only acks.

    .venv/bin/python bench/slack_ack.py [--rounds 3] [--single 200] [--burst 1000] [--senders 1,50]
    .venv/bin/python bench/slack_ack.py --alt waitress,cheroot   # also OMBot on other WSGI servers

Prints figures, asserts nothing. Each stack runs in its own process; all are measured in the same run,
interleaved round by round (the order rotating) so machine noise hits them alike:

  ombot      `python -m ombot bot` in HTTP mode (signing secret set), a real master behind it, our fake
             Slack Web API in a process of its own for its answers. The command is `help`, which starts
             no job: the listener acks, hands the work to OMBot's pool, and the answer goes to the
             response_url afterwards, in the same process, as in production.
  bare       App(token=..., signing_secret=..., client=WebClient(base_url=fake)) with one
             @app.command("/om") that calls ack(), on the default threaded WSGI stack: wsgiref's
             make_server with a ThreadingMixIn WSGIServer and slack_bolt's SlackRequestHandler; Bolt's
             defaults otherwise (process_before_response=False, request verification on). It answers
             nothing after the ack.
  bare-q128  the same bare app with a listen backlog of 128 instead of socketserver's 5 (OMBot's
             server uses 128): separates "the default backlog overflows" from "the stack is slower".
  ombot-X    (--alt X) OMBot's own service and Bolt app (bot.slack_app.build_app, the code `ombot bot`
             runs), served by WSGI server X (waitress, cheroot) instead of wsgiref; its own bot DB.

Each sample is one signed slash command (x-www-form-urlencoded, its own response_url) on a NEW
connection (wsgiref speaks HTTP/1.0 and closes after every response, so persistent connections are
not an option for every stack), timed from connect() until the response body is read. N senders each
send their next request as soon as the previous one is answered (closed loop). `cpu ms/req` is the
server process's user+system CPU time per request (OMBot's includes answering `help`).

The issue's goal: OMBot's p99 no worse than the bare default app's, at 1 and at 50 senders.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SECRET = "bench-signing-secret-0123456789abcdef"
READY_TIMEOUT = 60.0
SERVER_THREADS = 16  # for the --alt servers' fixed pools (waitress defaults to 4, cheroot to 10)


# -- child processes: the fake Slack, the bare Bolt app, OMBot on another server -------------------


def serve_fake(ready: Path, urls: int) -> None:
    """FakeSlack in its own process (its work must not land in the senders' GIL); it issues the
    response_urls up front and writes them, with its base URL and token, to `ready`."""
    from tests.fakeslack import FakeSlack

    fake = FakeSlack().start()
    info = {"url": fake.url, "bot_token": fake.bot_token,
            "response_urls": [fake.new_response_url(channel="C0OPS", user_id="U0ALICE") for _ in range(urls)]}
    report_ready(ready, json.dumps(info))
    threading.Event().wait()  # until the parent terminates this process


def serve_bare(ready: Path, api_url: str, token: str, backlog: int | None) -> None:
    """The bare default app: Bolt's defaults, wsgiref + ThreadingMixIn, one listener that acks.
    `backlog` overrides socketserver's listen backlog of 5."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from slack_bolt import App
    from slack_bolt.adapter.wsgi import SlackRequestHandler
    from slack_sdk import WebClient

    app = App(token=token, signing_secret=SECRET, client=WebClient(token=token, base_url=api_url))

    @app.command("/om")
    def om(ack: Any) -> None:
        ack()

    class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        request_queue_size = backlog or WSGIServer.request_queue_size

    class QuietHandler(WSGIRequestHandler):  # OMBot logs requests at debug level only; so does this
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, SlackRequestHandler(app), server_class=ThreadingWSGIServer,
                         handler_class=QuietHandler)
    report_ready(ready, str(server.server_address[1]))
    server.serve_forever()


def serve_ombot_on(ready: Path, config_path: Path, server_kind: str) -> None:
    """What `ombot bot` does in HTTP mode (bot.slack_app.serve_slack), on another WSGI server."""
    from slack_bolt.adapter.wsgi import SlackRequestHandler

    from ombot.bot.service import BotService
    from ombot.bot.settings import SlackSecrets
    from ombot.bot.slack_app import build_app, web_client
    from ombot import config as cfg

    secrets = SlackSecrets.from_env()
    service = BotService(cfg.load(config_path), origin="slack")
    client = web_client(secrets)
    app, transport = build_app(service, secrets, client, socket_mode=False)
    service.start(transport)
    wsgi = SlackRequestHandler(app)
    if server_kind == "waitress":
        from waitress import create_server

        server = create_server(wsgi, host="127.0.0.1", port=0, threads=SERVER_THREADS, backlog=128)
        report_ready(ready, str(server.effective_port))
        server.run()
    elif server_kind == "cheroot":
        from cheroot import wsgi as cheroot_wsgi

        server = cheroot_wsgi.Server(("127.0.0.1", 0), wsgi, numthreads=SERVER_THREADS, request_queue_size=128)
        server.prepare()
        report_ready(ready, str(server.bind_addr[1]))
        server.serve()
    else:
        raise SystemExit(f"unknown server {server_kind!r} (waitress, cheroot)")


def report_ready(ready: Path, text: str) -> None:
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(ready)


# -- starting and stopping them ------------------------------------------------------------------------


@dataclass
class Stack:
    name: str
    port: int
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args} did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return path.read_text()


@contextmanager
def helper(root: Path, name: str, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """Run this file in one of its serving modes as a child; yield what it reported, and its pid."""
    ready, log = root / f"{name}.ready", root / f"{name}.log"
    proc = subprocess.Popen([sys.executable, __file__, *args, "--ready", str(ready)], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield wait_for_file(ready, proc, log), proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ombot_env(fake: dict[str, Any]) -> dict[str, str]:
    return {"SLACK_BOT_TOKEN": fake["bot_token"], "SLACK_SIGNING_SECRET": SECRET, "OMBOT_SLACK_API_URL": fake["url"],
            "SLACK_APP_TOKEN": ""}


def start_stacks(stack: ExitStack, root: Path, fake: dict[str, Any], alts: list[str]) -> list[Stack]:
    from tests.fakeslack import TEAM_ID
    from tests.support import BotProcess, Cluster, bot_table, child_env, free_port

    port = free_port()
    cluster = Cluster(root / "cluster", {"local": ["m1"]}, extra_toml=bot_table(port, TEAM_ID))
    stack.callback(cluster.stop_all)
    cluster.start("m1")
    bot = BotProcess(cluster, ombot_env(fake))
    stack.callback(bot.stop)
    bot.start(port)
    assert bot.proc is not None
    stacks = [Stack("ombot", port, bot.proc.pid)]
    bare_args = ("--serve-bare", "--api-url", fake["url"], "--token", fake["bot_token"])
    for name, extra in (("bare", ()), ("bare-q128", ("--backlog", "128"))):
        bare_port, pid = stack.enter_context(helper(root, name, *bare_args, *extra))
        stacks.append(Stack(name, int(bare_port), pid))
    for kind in alts:  # own bot database each: no SQLite lock shared with the real `ombot bot`
        env = child_env({**ombot_env(fake), "OMBOT_BOT_DATABASE_URL": f"sqlite:///{root / f'bot-{kind}.db'}"})
        alt_port, pid = stack.enter_context(helper(root, f"ombot-{kind}", "--serve-ombot", kind, "--config",
                                                   str(cluster.config_path), env=env))
        stacks.append(Stack(f"ombot-{kind}", int(alt_port), pid))
    return stacks


# -- the load ------------------------------------------------------------------------------------------


@dataclass
class Series:
    stack: str
    senders: int
    latencies: list[float] = field(default_factory=list)  # seconds
    errors: dict[str, int] = field(default_factory=dict)
    cpu: float = 0.0  # server CPU seconds spent during this series

    def p(self, percent: int) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[percent - 1]


class Requests:
    """Signed slash-command bodies, each with its own (pre-issued) response_url."""

    def __init__(self, response_urls: list[str]) -> None:
        self._urls = iter(response_urls)

    def next(self) -> tuple[bytes, dict[str, str]]:
        from tests.fakeslack import signed_request, slash_command_body

        body = slash_command_body(text="help", response_url=next(self._urls))
        return body.encode(), signed_request(SECRET, body)


def one_request(port: int, body: bytes, headers: dict[str, str]) -> tuple[float, str | None]:
    """Latency of one POST on a new connection, and what went wrong (None when acked with 200)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/slack/events", body=body, headers=headers)
        reply = conn.getresponse()
        reply.read()
        error = None if reply.status == 200 else f"HTTP {reply.status}"
    except OSError as exc:
        error = type(exc).__name__
    finally:
        conn.close()
    return time.perf_counter() - started, error


def load(series: Series, stack: Stack, requests: Requests, count: int) -> None:
    """`series.senders` threads send `count` requests in all, each as soon as its previous was answered."""
    work: queue.SimpleQueue[tuple[bytes, dict[str, str]] | None] = queue.SimpleQueue()
    for _ in range(count):
        work.put(requests.next())  # signed before the clock starts
    for _ in range(series.senders):
        work.put(None)
    lock = threading.Lock()

    def sender() -> None:
        while (item := work.get()) is not None:
            latency, error = one_request(stack.port, *item)
            with lock:
                series.latencies.append(latency)
                if error:
                    series.errors[error] = series.errors.get(error, 0) + 1

    threads = [threading.Thread(target=sender) for _ in range(series.senders)]
    cpu_before = stack.cpu_seconds()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.2)  # let OMBot finish answering what it acked, so its CPU is counted with its series
    series.cpu += stack.cpu_seconds() - cpu_before


# -- report --------------------------------------------------------------------------------------------


def report(all_series: list[Series]) -> None:
    print(f"{'stack':<15} {'senders':>7} {'requests':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'cpu ms/req':>10} {'errors':>6}")
    for s in all_series:
        n = len(s.latencies)
        errors = sum(s.errors.values())
        print(f"{s.stack:<15} {s.senders:>7} {n:>8} {statistics.median(s.latencies) * 1e3:8.2f} "
              f"{s.p(90) * 1e3:8.2f} {s.p(99) * 1e3:8.2f} {max(s.latencies) * 1e3:8.2f} {s.cpu / n * 1e3:10.2f} "
              f"{errors:>6}" + (f"  {s.errors}" if s.errors else ""))
    by = {(s.stack, s.senders): s for s in all_series}
    for senders in sorted({s.senders for s in all_series}):
        for stack in sorted({s.stack for s in all_series if s.stack.startswith("ombot")}):
            ombot = by[(stack, senders)]
            for baseline in ("bare", "bare-q128"):
                other = by.get((baseline, senders))
                if other:
                    ratio = ombot.p(99) / other.p(99)
                    goal = f"  (the issue's goal, <= 1: {'met' if ratio <= 1 else 'NOT met'})" if (
                        stack, baseline) == ("ombot", "bare") else ""
                    print(f"  {senders:>2} sender(s): {stack} p99 / {baseline} p99 = {ratio:5.2f}{goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--single", type=int, default=200, help="requests per round at 1 sender (default 200)")
    parser.add_argument("--burst", type=int, default=1000, help="requests per round at >1 senders (default 1000)")
    parser.add_argument("--senders", default="1,50", help="concurrency levels (default 1,50)")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests per stack first (default 50)")
    parser.add_argument("--alt", default="", help="also serve OMBot on these WSGI servers: waitress,cheroot")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-ombot", help=argparse.SUPPRESS)
    parser.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--api-url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--urls", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--backlog", type=int, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve_fake:
        return serve_fake(opts.ready, opts.urls)
    if opts.serve_bare:
        return serve_bare(opts.ready, opts.api_url, opts.token, opts.backlog)
    if opts.serve_ombot:
        return serve_ombot_on(opts.ready, opts.config, opts.serve_ombot)

    levels = [int(n) for n in opts.senders.split(",")]
    alts = [a for a in opts.alt.split(",") if a]
    per_stack = opts.warmup + opts.rounds * sum(opts.single if n == 1 else opts.burst for n in levels)
    with tempfile.TemporaryDirectory(prefix="ombot-bench-ack-") as tmp, ExitStack() as processes:
        root = Path(tmp)
        fake_info, _ = processes.enter_context(
            helper(root, "fake", "--serve-fake", "--urls", str((3 + len(alts)) * per_stack)))
        fake = json.loads(fake_info)
        requests = Requests(fake["response_urls"])
        stacks = start_stacks(processes, root, fake, alts)
        print(f"slash-command acks: {opts.rounds} round(s), python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        for stack in stacks:
            load(Series(stack.name, 4), stack, requests, opts.warmup)
        results = {(stack.name, n): Series(stack.name, n) for n in levels for stack in stacks}
        for round_ in range(opts.rounds):
            for n in levels:
                for stack in stacks[round_ % len(stacks):] + stacks[:round_ % len(stacks)]:
                    load(results[(stack.name, n)], stack, requests, opts.single if n == 1 else opts.burst)
        report(list(results.values()))
        print(f"  load average after the run: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
