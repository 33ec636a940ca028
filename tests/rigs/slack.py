"""The Slack rig: a site's masters, our fake Slack, and real `ombot bot` processes on it; signed slash
commands and clicks in, the channel's messages and the answers by response_url out."""

from __future__ import annotations

import json
import re
import sqlite3
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from ombot.masters import FINAL_STATES, JobRef
from tests.fakeslack import TEAM_ID, Call, FakeSlack, interactive_body, post_to_bot
from tests.support import ALLOW_ALL_POLICY, REPO, BotProcess, Cluster, bot_table, free_port

SECRET = "0c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f"  # the signing secret of every rig's bot
CHANNEL = "C0OPS"  # where a rig's commands are typed unless told otherwise
ALICE = "U0ALICE"  # who types them
SITE_MODULES = REPO / "tests" / "site_modules"  # test.sleep and friends
REPLY_WAIT = 15.0  # seconds an answer may take; generous, as every wait here (a shared, noisy machine)


def slack_env(fake: FakeSlack, socket_mode: bool = False, **extra: str) -> dict[str, str]:
    """The environment of an `ombot bot` on `fake`: HTTP mode checking SECRET, or Socket Mode (no secret)."""
    env = {"SLACK_BOT_TOKEN": fake.bot_token, "OMBOT_SLACK_API_URL": fake.url,
           "SLACK_SIGNING_SECRET": "" if socket_mode else SECRET}
    if socket_mode:
        env["SLACK_APP_TOKEN"] = fake.app_token
    return {**env, **extra}


def floor(*masters: str, module: str = "shell.exec") -> str:
    """The masters' own approval floor: there `module` needs one approver besides the requester,
    whatever the bot says (`[masters.M.approvals]`)."""
    return "".join(f'\n[masters.{master}.approvals]\n"{module}" = 1\n' for master in masters)


@dataclass
class Reply:
    """The answers (ephemeral, by response_url) to one command or click."""

    fake: FakeSlack
    url: str
    timeout: float = REPLY_WAIT

    def posts(self) -> list[Call]:
        token = self.url.rsplit("/", 1)[1]
        return [c for c in self.fake.response_posts if c.path.endswith(token)]

    def texts(self) -> list[str]:
        return [str(c.body.get("text", "")) for c in self.posts()]

    def wait(self, needle: str = "", timeout: float | None = None) -> str:
        """The first answer whose text holds `needle`, once it came."""
        return self.fake.wait_for(lambda: next((t for t in self.texts() if needle in t), None),
                                  timeout or self.timeout, what=f"an answer containing {needle!r}; got {self.texts()}")

    def wait_body(self, needle: str = "", timeout: float | None = None) -> str:
        """The first answer whose whole body (as JSON: blocks too) holds `needle`."""
        def found() -> str | None:
            return next((body for body in map(json.dumps, (c.body for c in self.posts())) if needle in body), None)
        return self.fake.wait_for(found, timeout or self.timeout,
                                  what=f"an answer containing {needle!r}; got {[c.body for c in self.posts()]}")

    def first(self) -> str:
        return self.fake.wait_for(lambda: next(iter(self.texts()), None), self.timeout, what="an answer")

    def number(self, pattern: str) -> int:
        """A number the bot answered with, e.g. number("Waiting as request #") or ("Starting job #")."""
        found = re.search(re.escape(pattern) + r"(\d+)", self.wait(pattern))
        assert found is not None
        return int(found.group(1))


def state_of(card: dict[str, Any]) -> str:
    """A job card's state: `ok` of `[#3 ok] echo on ...`."""
    return str(card.get("text", "")).split("]")[0].split()[-1]


def job_cards(fake: FakeSlack, number: int | None, channel: str) -> list[dict[str, Any]]:
    """The cards of job #number as the channel shows them now (every job's card without a number)."""
    lead = "[#" if number is None else f"[#{number} "
    return [m for m in fake.messages(channel) if m.get("text", "").startswith(lead)]


class SlackRig:
    """A site (tests.support.Cluster) with its masters up, the fake Slack, and the bots that answer on it:
    `bots` maps each bot's port to its process, `port` is the one in the site's own config."""

    reply_wait = REPLY_WAIT  # a suite whose answers come later (schedules) waits longer
    bot_args: tuple[str, ...] = ("bot",)  # the command line after --config (global options may come first)

    def __init__(self, fake: FakeSlack, cluster: Cluster, env: dict[str, str], port: int) -> None:
        self.fake, self.cluster, self.env, self.port = fake, cluster, env, port
        self.bots: dict[int, BotProcess] = {}

    # -- the bots --

    @property
    def bot(self) -> BotProcess:
        return self.bots[self.port]

    @bot.setter
    def bot(self, bot: BotProcess) -> None:
        self.bots[self.port] = bot

    def start_bot(self, port: int | None = None, env: dict[str, str] | None = None) -> BotProcess:
        """A bot process; another port gets its own copy of the config (same keys, same database) and log."""
        port = self.port if port is None else port
        config, log = None, None
        if port != self.port:
            config = self.cluster.root / f"ombot-{port}.toml"  # beside the original: relative paths still hold
            config.write_text(self.cluster.config_path.read_text().replace(
                f'listen = "127.0.0.1:{self.port}"', f'listen = "127.0.0.1:{port}"'))
            log = self.cluster.root / f"bot-{port}.log"
        bot = BotProcess(self.cluster, {**self.env, **(env or {})}, self.bot_args, config_path=config, log_path=log)
        self.bots[port] = bot  # kept before it starts: one that fails to listen is still stopped at the end
        return bot.start(port or None)  # Socket Mode (port 0) listens on nothing

    def stop_bots(self) -> None:
        for bot in self.bots.values():
            bot.stop()

    def close(self) -> None:
        """Stop what the rig started besides the masters (the bots; a subclass's own processes too)."""
        self.stop_bots()
        for port, bot in self.bots.items():  # pytest shows it only when the test failed
            print(f"-- the log of the bot on port {port}:\n{bot.log()}")

    def restart_bot(self, between: Callable[[], object] | None = None) -> None:
        """Stop every bot, run `between` (an edit of the policy, say), and start each again on its port."""
        self.stop_bots()
        if between is not None:
            between()
        for port, bot in list(self.bots.items()):
            self.start_bot(port, bot.env)

    def wait_connected(self, count: int = 1, timeout: float = 30) -> None:
        """Socket Mode: wait for the bots' websockets; fail at once, with its log, if a bot died."""
        def connected() -> bool:
            for bot in self.bots.values():
                if bot.proc is not None and bot.proc.poll() is not None:
                    raise AssertionError(f"ombot bot exited {bot.proc.returncode}:\n{bot.log()}")
            return self.fake.socket.connections >= count
        self.fake.wait_for(connected, timeout, what=f"{count} Socket Mode connection(s)")

    # -- talking to the bots --

    def send(self, body: str, headers: dict[str, str] | None = None, port: int | None = None) -> tuple[int, str]:
        """POST a form body as Slack would (signed with SECRET unless `headers` say otherwise)."""
        return post_to_bot(port or self.port, body, SECRET, headers)

    def command(self, text: str, user: str = ALICE, channel: str = CHANNEL, port: int | None = None,
                **fields: str) -> Reply:
        """`/om TEXT` typed by `user` in `channel` (a live trigger and response_url); its answers."""
        sent = self.fake.slash_command(text=text, user_id=user, channel_id=channel, **fields)
        status, _ = self.send(urlencode(sent), port=port)
        assert status == 200
        return Reply(self.fake, sent["response_url"], self.reply_wait)

    def click_body(self, action_id: str, value: str, ts: str, user: str = ALICE,
                   channel: str = CHANNEL) -> tuple[str, Reply]:
        """The form body of a click on a button of message `ts`, and where its answers go."""
        payload = self.fake.block_actions(action_id, value, user_id=user, channel_id=channel, message_ts=ts)
        return interactive_body(payload), Reply(self.fake, payload["response_url"], self.reply_wait)

    def click(self, action_id: str, value: str, ts: str, user: str = ALICE, channel: str = CHANNEL) -> Reply:
        body, reply = self.click_body(action_id, value, ts, user, channel)
        assert self.send(body)[0] == 200
        return reply

    # -- what the channel shows --

    def posted(self, channel: str, needle: str, timeout: float = 30, replies: bool = True) -> dict[str, Any]:
        """A message in `channel` (thread replies too, unless `replies` is false) whose text holds `needle`."""
        return self.fake.wait_for(lambda: next((m for m in self.fake.messages(channel, include_replies=replies)
                                                if needle in m.get("text", "")), None),
                                  timeout, what=f"a message with {needle!r} in {channel}")

    def cards(self, number: int | None = None, channel: str = CHANNEL) -> list[dict[str, Any]]:
        """The cards of job #number as the channel shows them now (every job's card without a number)."""
        return job_cards(self.fake, number, channel)

    def card(self, number: int, channel: str = CHANNEL) -> dict[str, Any] | None:
        return next(iter(job_cards(self.fake, number, channel)), None)

    def final_card(self, number: int, timeout: float = 30, channel: str = CHANNEL) -> dict[str, Any]:
        """Job #number's card once it shows a final state."""
        return self.fake.wait_for(lambda: next((c for c in job_cards(self.fake, number, channel)
                                                if state_of(c) in FINAL_STATES), None),
                                  timeout, what=f"job #{number} to end")

    def replies(self, card: dict[str, Any], count: int = 1, timeout: float = REPLY_WAIT,
                channel: str = CHANNEL) -> list[dict[str, Any]]:
        """The messages in the card's thread (the results), once there are `count`."""
        def found() -> list[dict[str, Any]] | None:
            thread = [m for m in self.fake.thread(channel, card["ts"]) if m["ts"] != card["ts"]]
            return thread if len(thread) >= count else None
        return self.fake.wait_for(found, timeout, what=f"{count} message(s) in the thread of {card['ts']}")

    # -- state --

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of the bot's own database (SQLite, state/bot.db)."""
        with sqlite3.connect(self.cluster.root / "state" / "bot.db", timeout=10) as conn:
            return conn.execute(sql, args).fetchall()

    def master_rows(self, master: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a master's database (SQLite, STATE_DIR/M.db)."""
        with sqlite3.connect(self.cluster.master_db(master), timeout=10) as conn:
            return conn.execute(sql, args).fetchall()


R = TypeVar("R", bound=SlackRig)
CLUSTER_KEYWORDS = ("limits", "inventory", "clients", "admins")  # the rest of slack_rig's keywords are [bot] keys


@dataclass
class Pending:
    """An approval request as the channel shows it."""

    number: int
    request_id: str
    ts: str
    asked: Reply  # the requester's command: "Starting job #N" arrives there once approved


class ApprovalRig(SlackRig):
    """A Slack rig with the approval flow's words: ask, approve, and the channel's approval messages."""

    def approve(self, pending: Pending, user: str) -> Reply:
        return self.click("om_approve", pending.request_id, pending.ts, user)

    def ask(self, text: str, user: str = ALICE) -> Pending:
        """A command that needs approval: its request number and the Approve/Deny message."""
        reply = self.command(text, user)
        number = reply.number("Waiting as request #")
        message = self.approval_message(number)
        # the buttons as posted: a short expiry may have taken them off the message already
        posted = self.fake.wait_for_call("chat.postMessage", lambda c: str(c.body.get("text", "")).startswith(
            f"[approval #{number} "))
        blocks = posted.body["blocks"]
        blocks = json.loads(blocks) if isinstance(blocks, str) else blocks
        buttons = next(b for b in blocks if b["type"] == "actions")["elements"]
        assert [b["action_id"] for b in buttons] == ["om_approve", "om_deny"]
        return Pending(number, buttons[0]["value"], message["ts"], reply)

    def approval_message(self, number: int, state: str = "") -> dict[str, Any]:
        lead = f"[approval #{number} {state}"
        return self.fake.wait_for(lambda: next((m for m in self.fake.messages(CHANNEL)
                                                if m.get("text", "").startswith(lead)), None),
                                  what=f"approval message {lead!r}")

    def master_events(self, job_id: str, master: str = "m1") -> list[dict[str, Any]]:
        """A job's events at its master, seen with the bot's key (the bot's jobs are its own)."""
        router = self.cluster.router("chat:bot")
        try:
            return router.events(JobRef(job_id, "local", master))["events"]
        finally:
            router.close()


@contextmanager
def slack_rig(root: Path, idcs: dict[str, list[str]] | None = None, *, kind: type[R] = SlackRig,
              policy: str = ALLOW_ALL_POLICY, module_dirs: Sequence[Path] = (SITE_MODULES,), extra_toml: str = "",
              files: dict[str, str] | None = None, prepare: Callable[[Cluster], object] | None = None,
              start: Sequence[str] | None = None, cluster: Cluster | None = None, fake: FakeSlack | None = None,
              usergroups: dict[str, list[str]] | None = None, socket_mode: bool = False,
              env: dict[str, str] | None = None, bots: int = 1, **settings: Any) -> Iterator[R]:
    """A site under `root` with its masters running, the fake Slack and `bots` bot processes on it.

    idcs, policy, module_dirs and the Cluster's own keywords (limits, inventory, clients, admins) make
    the site; the other keywords are its `[bot]` keys beyond listen and team_id, `extra_toml` any other
    tables (a floor). `files` are written beside ombot.toml (audit rules), `prepare(cluster)` edits the
    site before anything starts, `start` names the masters to start (all by default). A given `cluster`
    is used as it is (its masters already up, its [bot] listen port read from its config); a given
    `fake` is shared and left running. On leaving: no breach of Slack's rules, then the bots, the
    masters and the fake stop.
    """
    with ExitStack() as stack:
        if fake is None:
            fake = stack.enter_context(FakeSlack(usergroups=usergroups))
        if cluster is None:
            port = 0 if socket_mode else free_port()
            own = {key: settings.pop(key) for key in CLUSTER_KEYWORDS if key in settings}
            cluster = Cluster(root, idcs or {"local": ["m1"]}, policy=policy, module_dirs=list(module_dirs),
                              extra_toml=bot_table(port or None, TEAM_ID, **settings) + extra_toml, **own)
            stack.callback(cluster.stop_all)
            for name, text in (files or {}).items():
                (cluster.root / name).write_text(text)
            if prepare is not None:
                prepare(cluster)
            for master in cluster.ports if start is None else start:
                cluster.start(master)
        else:
            port = int(tomllib.loads(cluster.config_path.read_text())["bot"]["listen"].rsplit(":", 1)[1])
        rig = kind(fake, cluster, slack_env(fake, socket_mode, **(env or {})), port)
        stack.callback(rig.close)
        rig.start_bot()
        for _ in range(bots - 1):
            rig.start_bot(free_port())
        if socket_mode:
            rig.wait_connected()
        yield rig
        fake.assert_no_violations()  # also fails on any Socket Mode envelope the bot never acked

