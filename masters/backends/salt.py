"""Run plans on Salt minions through the salt-master on this machine, with Salt's LocalClient.

Each plan step becomes one Salt call published to exactly the job's minions (`tgt_type="list"`);
hosts that are ready for the same call at the same moment share one publish. Each host walks its
own steps at its own pace (a generator per host, fed the minion's returns from the master's event
bus as they arrive) and is reported as soon as it is done. Every request value travels as a keyword
argument (`kwarg`), never as a positional string: Salt turns a positional `runas=root` into a
keyword argument, a value in `kwarg` stays data. A minion silent for `answer_seconds` is asked
whether it still runs the job (`saltutil.find_job`); one that does not answer that either is
unreachable. docs/backends.md describes the set-up, what each step becomes, and the limits.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import salt.client
import salt.config

from ombot.masters.backends import ansible_snippets as snippets
from ombot.masters.backends import put_file
from ombot.masters.backends.ansible_play import PlanError, put_data, put_label, tmp_prefix
from ombot.masters.backends.base import CappedText, HostResult, HostStatus, RunContext, Unsupported
from ombot.modules import (
    Arg, Command, Emit, FirstAvailable, Ping, Plan, PutFile, RequireWithin, RunPlaybook, SaltState, Shell, Step,
    TailFile, TempPath,
)
from ombot.config import MasterSettings, SaltSettings
from ombot.errors import OmbotError

log = logging.getLogger("ombot.master.salt")

EVENT_WAIT_SECONDS = 0.1  # how long one wait on the event bus lasts: the bound on reacting to a cancel
LAST_ASK_SECONDS = 2.0  # at the deadline, how long minions that never answered get to say they run the job
PUBLISH_TIMEOUT_SECONDS = 10  # the salt-master must take a publish this soon
TMP_ROOT = "/tmp"  # where the job's temporary directory is made on each minion (as STOP_JOB looks for it)
# argv: PATH ; a fresh private directory (fails if anything is already there, so nothing planted is used)
MKDIR = "import os, sys\nos.mkdir(sys.argv[1], 0o700)\n"
CHECK_SKIP = "check: not run (Salt cannot tell what it would do): "
_STATE_WORDS = {True: "ok", None: "would change", False: "failed"}


class StepFailed(Exception):
    """A step that ended the host's run, with the exit code the host is reported with."""

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc


@dataclass(frozen=True)
class _Call:
    """One Salt function call on a minion; every argument a keyword argument."""

    fun: str
    kwarg: dict[str, Any]

    def key(self) -> str:
        return self.fun + json.dumps(self.kwarg, sort_keys=True, default=str)


@dataclass
class _Reply:
    """What a minion returned for one call."""

    ret: Any
    retcode: int | None


@dataclass
class _Host:
    """One host's progress through its plan."""

    name: str
    out: CappedText
    err: CappedText
    program: Generator[_Call, _Reply, None] | None = None
    started: float = field(default_factory=time.time)
    call: _Call | None = None  # waiting to be published
    jid: str | None = None  # the published call it waits for
    waiting_since: float = 0.0  # when it was last published to or heard from (monotonic)
    asked: str | None = None  # the jid of a find_job it has not answered yet
    asked_at: float = 0.0
    idle_answers: int = 0  # find_job answers saying it runs nothing
    tmp: str = ""  # its temporary directory, if the plan needs one
    heard: bool = False  # it returned or answered something in this job
    status: HostStatus = HostStatus.OK
    rc: int | None = None
    error: str | None = None
    jids: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    reported: bool = False


def accepted_minions(config: Path) -> list[str]:
    """The ids of the minions whose keys the salt-master at `config` has accepted."""
    directory = _key_dir(config)
    if not directory.is_dir():
        raise OmbotError(f"salt: {directory} (accepted minion keys) does not exist; is {config} the "
                         "salt-master's config?")
    return sorted(p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


@functools.lru_cache(maxsize=8)
def _key_dir(config: Path) -> Path:
    """Where the salt-master keeps accepted minion keys (its config is read once: it is YAML with includes)."""
    return Path(salt.config.client_config(str(config))["pki_dir"]) / "minions"


class SaltBackend:
    """Runs each job's plan on minions through the local salt-master (see the module docstring)."""

    name = "salt"

    def __init__(self, settings: MasterSettings) -> None:
        self.master_id, self.tuning = settings.id, settings.salt
        if not self.tuning.config.is_file():
            raise OmbotError(f"masters.{settings.id}.salt.config: {self.tuning.config} is not a salt-master "
                             "config file")
        self._idle: list[salt.client.LocalClient] = []  # made ~0.1-0.2 s each: kept between jobs
        self._lock = threading.Lock()
        self._release(self._client())  # a config or key problem shows at start, not at the first job

    def vet(self, plan: Plan, check: bool) -> Plan:
        """At submit: no playbooks, and only the states this master allows."""
        for step in plan.steps:
            if isinstance(step, RunPlaybook):
                raise Unsupported("the salt backend cannot run Ansible playbooks")
            if isinstance(step, SaltState) and step.name not in self.tuning.states:
                allowed = ", ".join(self.tuning.states) or "none"
                raise Unsupported(f"state {step.name!r} is not allowed on this master (allowed: {allowed}; "
                                  f"[masters.{self.master_id}.salt] states)")
        return plan

    def preview(self, plan: Plan, hosts: list[str], check: bool) -> dict[str, Any]:
        """The Salt calls a job of this plan would publish to the hosts (a dry run shows them)."""
        steps = plan.steps
        calls = [] if any(_contacts(s) for s in steps) else ["test.ping"]
        tmp = plan.uses_temp_path()
        if tmp:
            calls.append("cmd.run_all: make the temporary directory /tmp/ombot-JOB-RANDOM-HOST")
        calls += [line for step in steps for line in _preview(step, check)]
        if tmp:
            calls.append("file.remove: the temporary directory")
        return {"salt": {"tgt": hosts, "tgt_type": "list", "calls": calls}}

    def run(self, ctx: RunContext) -> None:
        client = self._client()
        try:
            _Job(ctx, client, self.tuning).run()
        finally:
            self._release(client)

    def _client(self) -> salt.client.LocalClient:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            return salt.client.LocalClient(c_path=str(self.tuning.config))
        except Exception as exc:
            raise OmbotError(f"salt: cannot use the salt-master config {self.tuning.config}: {exc}") from None

    def _release(self, client: salt.client.LocalClient) -> None:
        client.event.close_pub()  # no events pile up for an idle client
        with self._lock:
            self._idle.append(client)


class _Job:
    """One job: publishes each host's next call, feeds returns back, watches silent minions."""

    def __init__(self, ctx: RunContext, client: salt.client.LocalClient, tuning: SaltSettings) -> None:
        self.ctx, self.client, self.tuning = ctx, client, tuning
        self.hosts = {h: _Host(h, CappedText(ctx.output_cap), CappedText(ctx.output_cap)) for h in ctx.hosts}
        self.ident = re.sub(r"[^A-Za-z0-9_.-]", "_", ctx.job_id)[:64]
        # Each host's temporary directory: unguessable, and distinct per minion (minions may share a /tmp).
        self.tmp = f"{TMP_ROOT}/{tmp_prefix(self.ident)}{secrets.token_hex(8)}-"
        self.waiting: dict[str, list[_Host]] = {}  # jid -> hosts whose call it is
        self.asking: dict[str, list[_Host]] = {}  # find_job jid -> hosts asked
        self.env = {"PATH": snippets.CHILD_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMBOT_JOB_ID": ctx.job_id}

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        queue = list(self.hosts.values())
        active: list[_Host] = []
        try:
            while queue or active:
                if self._stopped():
                    self._stop(active, queue)
                    return
                while queue and len(active) < self.ctx.max_parallel:  # limits.max_parallel_hosts at once
                    host = queue.pop(0)
                    active.append(host)
                    host.program = self._program(host)
                    self._advance(host, None)
                self._publish([h for h in active if h.call is not None])
                self._read_events(max(0.001, min(EVENT_WAIT_SECONDS, self.ctx.remaining())))
                self._watch_silent([h for h in active if h.jid is not None])
                active = [h for h in active if not h.reported]
        finally:
            for host in self.hosts.values():
                if not host.reported:  # a bug in the loop must cost the hosts, loudly, not leave them unreported
                    self._finish(host, HostStatus.FAILED, "backend error: the job ended without this host's result")

    def _stopped(self) -> bool:
        return self.ctx.cancelled.is_set() or self.ctx.remaining() <= 0

    def _publish(self, ready: list[_Host]) -> None:
        groups: dict[str, list[_Host]] = {}
        for host in ready:
            assert host.call is not None
            groups.setdefault(host.call.key(), []).append(host)
        for hosts in groups.values():
            call = hosts[0].call
            assert call is not None
            jid, known = self._send([h.name for h in hosts], call)
            now = time.monotonic()
            for host in hosts:
                host.call = None
                if jid is None:
                    self._finish(host, HostStatus.FAILED, f"the salt-master did not take the job: {known}")
                elif host.name not in known:
                    self._finish(host, HostStatus.UNREACHABLE, f"the salt-master has no accepted key for {host.name}")
                else:
                    host.jid, host.waiting_since, host.idle_answers = jid, now, 0
                    host.jids.append(jid)
                    self.waiting.setdefault(jid, []).append(host)

    def _send(self, names: list[str], call: _Call) -> tuple[str | None, Any]:
        """Publish; (jid, the minions the master targeted) or (None, why not)."""
        try:
            pub = self.client.run_job(names, call.fun, kwarg=call.kwarg, tgt_type="list", listen=True,
                                      timeout=PUBLISH_TIMEOUT_SECONDS)
        except Exception as exc:  # the salt-master is down or refused us
            log.warning("job %s: publishing %s failed: %s", self.ctx.job_id, call.fun, exc)
            return None, str(exc) or type(exc).__name__
        if not pub or not pub.get("jid"):
            return None, "no job id (is the salt-master running, and this user allowed to publish?)"
        return str(pub["jid"]), set(pub.get("minions") or ())

    def _read_events(self, wait: float) -> None:
        """Wait briefly for one return, then take every return already there."""
        event = self.client.event.get_event(wait=wait, tag="salt/job/", full=True)
        while event is not None:
            self._on_event(event)
            event = self.client.event.get_event(wait=0.001, tag="salt/job/", full=True, no_block=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        parts = str(event.get("tag", "")).split("/")
        if len(parts) != 5 or parts[3] != "ret":  # salt/job/JID/ret/MINION
            return
        jid, minion, data = parts[2], parts[4], event.get("data") or {}
        if jid in self.asking:
            self._on_answer(jid, minion, data.get("return"))
            return
        for host in self.waiting.get(jid, ()):
            if host.name == minion and host.jid == jid and not host.reported:
                host.jid, host.asked, host.heard = None, None, True
                self.waiting[jid].remove(host)
                retcode = data.get("retcode")
                self._advance(host, _Reply(data.get("return"), retcode if isinstance(retcode, int) else None))
                return

    def _watch_silent(self, busy: list[_Host]) -> None:
        """Ask minions silent for answer_seconds whether they run the job; unreachable if they do not say."""
        now, limit = time.monotonic(), self.tuning.answer_seconds
        ask: dict[str, list[_Host]] = {}
        for host in busy:
            if host.asked is not None and now - host.asked_at > limit:
                self._finish(host, HostStatus.UNREACHABLE, f"the minion did not answer within {limit:g} s")
            elif host.asked is None and now - host.waiting_since > limit:
                assert host.jid is not None
                ask.setdefault(host.jid, []).append(host)
        for jid, hosts in ask.items():
            self._ask(jid, hosts)

    def _ask(self, jid: str, hosts: list[_Host]) -> None:
        asked, _ = self._send([h.name for h in hosts], _Call("saltutil.find_job", {"jid": jid}))
        for host in hosts:
            host.asked, host.asked_at = asked or "", time.monotonic()
        if asked is not None:
            self.asking[asked] = hosts

    def _last_word(self, hosts: list[_Host]) -> None:
        """At the deadline, briefly ask the minions that never answered whether they run the job: a busy
        minion is then timed out, and only a silent one unreachable."""
        groups: dict[str, list[_Host]] = {}
        for host in hosts:
            assert host.jid is not None
            groups.setdefault(host.jid, []).append(host)
        for jid, group in groups.items():
            self._ask(jid, group)
        end = time.monotonic() + min(LAST_ASK_SECONDS, self.tuning.answer_seconds)
        while time.monotonic() < end and any(not h.heard and not h.reported for h in hosts):
            self._read_events(EVENT_WAIT_SECONDS)

    def _on_answer(self, asked: str, minion: str, answer: Any) -> None:
        for host in self.asking.get(asked, ()):
            if host.name != minion or host.reported:  # any of its asks: an answer is an answer
                continue
            host.asked, host.heard, host.waiting_since = None, True, time.monotonic()
            if answer:  # the job's details: still running it
                host.idle_answers = 0
            else:
                host.idle_answers += 1
                if host.idle_answers >= 2:  # twice, answer_seconds apart: its return is not coming
                    self._finish(host, HostStatus.FAILED, "the minion runs nothing for this job and sent no result")

    def _stop(self, active: list[_Host], queue: list[_Host]) -> None:
        """Cancel or deadline: end what the job runs on its minions, report every unfinished host."""
        cancelled = self.ctx.cancelled.is_set()
        unheard = [h for h in active if not h.reported and not h.heard and h.jid is not None]
        if unheard and not cancelled:
            self._last_word(unheard)
        busy = [h.name for h in active if not h.reported and h.jid is not None]
        if busy:  # fire and forget: ends every process carrying this job's id, removes its temp dir
            self._send(busy, _Call("cmd.run_all", self._snippet(snippets.STOP_JOB, [self.ctx.job_id,
                                                                                  tmp_prefix(self.ident)])))
        for host in active + queue:
            if host.reported:
                continue
            if cancelled:
                self._finish(host, HostStatus.CANCELLED, "cancelled")
            elif host in active and not host.heard:
                self._finish(host, HostStatus.UNREACHABLE, "the minion did not answer within the job's timeout")
            else:
                self._finish(host, HostStatus.TIMED_OUT, "timed out")

    # -- one host ------------------------------------------------------------------------------

    def _advance(self, host: _Host, reply: _Reply | None) -> None:
        """Feed the host's program its last reply; keep its next call, or report it when it ends."""
        assert host.program is not None
        try:
            host.call = next(host.program) if reply is None else host.program.send(reply)
        except StopIteration:
            self._finish(host, HostStatus.OK, None)
        except StepFailed as exc:
            host.rc = exc.rc if exc.rc is not None else host.rc
            self._finish(host, HostStatus.FAILED, str(exc))
        except Exception as exc:  # a surprise in one return must cost that host, not the job
            log.exception("job %s: could not carry out the plan on %s", self.ctx.job_id, host.name)
            self._finish(host, HostStatus.FAILED, f"backend error: {type(exc).__name__}")

    def _finish(self, host: _Host, status: HostStatus, error: str | None) -> None:
        if host.reported:
            return
        host.reported, host.status, host.error = True, status, error
        if host.tmp:  # given up on mid-plan: remove its temporary directory, without waiting
            self._send([host.name], _Call("file.remove", {"path": host.tmp}))
        if host.jid is not None and host in self.waiting.get(host.jid, []):
            self.waiting[host.jid].remove(host)
        result = HostResult.from_output(host.name, status, host.out, host.err, rc=host.rc, started=host.started,
                                        ended=time.time(), error=error)
        result.data = {"salt": {"jids": host.jids, **host.data}}
        if status is HostStatus.OK and self.ctx.plan.parse is not None:
            try:
                result.data = {**self.ctx.plan.parse(result.stdout), **result.data}
            except Exception as exc:  # a module's parser failing is that host's failure, not the job's
                result.status, result.error = HostStatus.FAILED, f"could not parse output: {type(exc).__name__}: {exc}"
        self.ctx.report(result)

    def _program(self, host: _Host) -> Generator[_Call, _Reply, None]:
        """The host's plan as the Salt calls it takes, in order; each yield is one call and its reply."""
        steps = self.ctx.plan.steps
        if not any(_contacts(step) for step in steps):
            _ok((yield _Call("test.ping", {})), "test.ping")  # an unreachable minion is reported so, even for echo
        tmp = self.ctx.plan.uses_temp_path()
        if tmp:
            host.tmp = self.tmp + re.sub(r"[^A-Za-z0-9_.-]", "_", host.name)
            _ran((yield _Call("cmd.run_all", self._snippet(MKDIR, [host.tmp]))), host, "the temporary directory",
                 quiet=True)
        failed: StepFailed | None = None
        try:
            for step in steps:
                yield from self._step(step, host)
        except StepFailed as exc:
            failed = exc
        if tmp:  # after a failed step too; a host given up on gets it from _finish
            yield _Call("file.remove", {"path": host.tmp})
            host.tmp = ""
        if failed is not None:
            raise failed

    def _step(self, step: Step, host: _Host) -> Generator[_Call, _Reply, None]:
        check = self.ctx.check
        match step:
            case Emit(text):
                host.out.write(text.encode() + b"\n")
            case Ping():
                _ok((yield _Call("test.ping", {})), "test.ping")
                host.out.write(b"pong\n")
            case Command() | Shell() if check:
                host.out.write(f"{CHECK_SKIP}{Plan(step).describe()[0]}\n".encode())
            case Command():
                _ran((yield self._command(step, host)), host, str(step.argv[0]))
            case Shell(cmd):
                _ran((yield _Call("cmd.run_all", {"cmd": cmd, "python_shell": True, "shell": "/bin/sh",
                                                  **self._cmd_options()})), host, "/bin/sh")
            case FirstAvailable(commands):
                probe = yield _Call("cmd.run_all", self._snippet(snippets.FIRST_INSTALLED,
                                                                 [str(c.argv[0]) for c in commands]))
                chosen = commands[int(_ran(probe, host, "the program check", quiet=True).strip())]
                if check:
                    host.out.write(f"{CHECK_SKIP}{Plan(chosen).describe()[0]}\n".encode())
                else:
                    _ran((yield self._command(chosen, host)), host, str(chosen.argv[0]))
            case PutFile():
                _put_reply((yield self._put_file(step, host)), host, self._arg(step.dest, host), check)
            case RequireWithin(path, roots, param):
                _ran((yield _Call("cmd.run_all", self._snippet(snippets.REQUIRE_WITHIN, [_label(param), path,
                                                                                        *roots]))),
                     host, "the path check", quiet=True)
            case TailFile(path, lines, roots, param):
                reply = yield _Call("cmd.run_all", self._snippet(snippets.TAIL, [
                    _label(param), path, str(lines), str(self.ctx.output_cap), *roots]))
                _tail(reply, host)
            case SaltState(name):
                _state_run((yield _Call("state.apply", {"mods": name, "test": check, "queue": False})), host, check)
            case _:
                raise StepFailed(f"the salt backend cannot run {type(step).__name__}")

    def _cmd_options(self) -> dict[str, Any]:
        # Output keeps its trailing newlines; request data is never written to the minion's log.
        return {"env": self.env, "rstrip": False, "output_loglevel": "quiet", "ignore_retcode": True,
                "bg": False}

    def _command(self, step: Command, host: _Host) -> _Call:
        kwarg: dict[str, Any] = {"cmd": [self._arg(a, host) for a in step.argv], "python_shell": False,
                                 **self._cmd_options()}
        if step.stdin is not None:
            kwarg["stdin"] = step.stdin
        return _Call("cmd.run_all", kwarg)

    def _snippet(self, code: str, args: list[str]) -> dict[str, Any]:
        return {"cmd": [self.tuning.python, "-c", code, *args], "python_shell": False, **self._cmd_options()}

    def _arg(self, arg: Arg, host: _Host) -> str:
        return f"{host.tmp}/{arg.name}" if isinstance(arg, TempPath) else arg

    def _put_file(self, step: PutFile, host: _Host) -> _Call:
        """put_file.py run on the minion: the path check and the write in one step, by descriptors; the
        content base64 on stdin (a keyword argument, never in a shell string)."""
        try:
            data = put_data(step, self.ctx.file_store)
        except PlanError as exc:
            raise StepFailed(str(exc)) from None
        args = put_file.arguments(step.mode, step.owner, step.group, step.roots, _label(step.param), self.ctx.check,
                                  put_label(step))
        return _Call("cmd.run_all", {**self._snippet(put_file.source(), [self._arg(step.dest, host), *args]),
                                     "stdin": put_file.stdin(data)})


# -- what the plan needs ---------------------------------------------------------------------


def _contacts(step: Step) -> bool:
    return not isinstance(step, Emit)


def _preview(step: Step, check: bool) -> list[str]:
    skip = " (not run: a check run)" if check else ""
    match step:
        case Emit():
            return []
        case Ping():
            return ["test.ping"]
        case Command(argv, stdin):
            return [f"cmd.run_all cmd={json.dumps([str(a) for a in argv])} python_shell=False"
                    + (f" stdin=<{len(stdin)} characters>" if stdin is not None else "") + skip]
        case Shell(cmd):
            return [f"cmd.run_all cmd={json.dumps(cmd)} python_shell=True shell=/bin/sh{skip}"]
        case FirstAvailable(commands):
            return [f"cmd.run_all: which of {', '.join(str(c.argv[0]) for c in commands)} is installed",
                    f"cmd.run_all: the first installed of: {'; '.join(Plan(c).describe()[0] for c in commands)}{skip}"]
        case PutFile():
            return [f"cmd.run_all [python, -c, PUT_FILE] (content base64 on stdin): {Plan(step).describe()[0]}"
                    + (" (check: writes nothing)" if check else "")]
        case RequireWithin() | TailFile():
            return [f"cmd.run_all [python, -c, SNIPPET]: {Plan(step).describe()[0]}"]
        case SaltState(name):
            return [f"state.apply mods={name} test={check}"]
    return [f"(cannot run {type(step).__name__})"]


def _label(param: str | None) -> str:
    return f"{param}: " if param else ""


# -- reading replies -------------------------------------------------------------------------


def _ok(reply: _Reply, what: str) -> None:
    if reply.ret is not True:
        raise StepFailed(f"{what} failed: {_short(reply.ret)}")


def _ran(reply: _Reply, host: _Host, program: str, quiet: bool = False) -> str:
    """A cmd.run_all reply: its output into the host's (unless quiet), a non-zero exit fails the host."""
    ret = reply.ret
    if not isinstance(ret, dict) or "retcode" not in ret:  # Salt could not start it, or the function raised
        text = _short(ret)
        if "[Errno 2]" in text:
            raise StepFailed(f"command not found: {program}", rc=127)
        raise StepFailed(f"{program}: {text}")
    stdout, stderr, rc = str(ret.get("stdout") or ""), str(ret.get("stderr") or ""), ret.get("retcode")
    if not quiet:
        host.out.write(stdout.encode())
        if stderr:
            host.err.write(stderr.encode())
        host.rc = rc if isinstance(rc, int) else None
    if rc != 0:
        lines = [line for line in stderr.split(snippets.TAIL_TOTAL_MARK)[0].splitlines() if line]
        raise StepFailed(lines[-1] if quiet and lines else f"{program} exited with {rc}", rc=rc)
    return stdout


def _tail(reply: _Reply, host: _Host) -> None:
    ret = reply.ret
    if isinstance(ret, dict) and snippets.TAIL_TOTAL_MARK in str(ret.get("stderr") or ""):
        stderr, _, total = str(ret["stderr"]).rpartition(snippets.TAIL_TOTAL_MARK)
        stdout = str(ret.get("stdout") or "")
        host.out.write(stdout.encode())
        host.out.total += max(0, int(total) - len(stdout.encode()))  # the snippet sent at most the cap
        if stderr:
            host.err.write(stderr.encode())
        host.rc = ret.get("retcode") if isinstance(ret.get("retcode"), int) else None
        return
    _ran(reply, host, "the file check", quiet=True)


def _states(reply: _Reply) -> list[dict[str, Any]]:
    """A state run's results in the order they ran; a list or text reply is Salt refusing the run."""
    ret = reply.ret
    if not isinstance(ret, dict) or not all(isinstance(v, dict) for v in ret.values()):
        raise StepFailed(f"salt: {_short(ret)}", rc=reply.retcode)
    return sorted(ret.values(), key=lambda r: r.get("__run_num__", 0))


def _put_reply(reply: _Reply, host: _Host, dest: str, check: bool) -> None:
    """put_file's answer; a check run shows what would change."""
    changed, diff = put_file.reply(_ran(reply, host, "the file write", quiet=True))
    if check and changed:
        host.out.write(f"would change {dest}:\n{diff}".encode())


def _state_run(reply: _Reply, host: _Host, check: bool) -> None:
    counts = {"ok": 0, "changed": 0, "would_change": 0, "failed": 0}
    for result in _states(reply):
        outcome, changes = result.get("result"), result.get("changes") or {}
        word = "changed" if outcome is True and changes else _STATE_WORDS.get(outcome, "failed")
        counts[word.replace(" ", "_")] += 1
        host.out.write(f"{result.get('__id__', result.get('name'))}: {word}: {result.get('comment', '')}\n".encode())
        if changes:
            host.out.write(_changes(changes).encode())
    host.data["states"] = counts
    if counts["failed"] or (reply.retcode not in (0, None) and not check):
        raise StepFailed(f"{counts['failed']} of {sum(counts.values())} states failed", rc=reply.retcode or 1)


def _changes(changes: dict[str, Any]) -> str:
    """A state's changes as text: a diff as it is, anything else as JSON."""
    diff = changes.get("diff")
    if isinstance(diff, str) and len(changes) == 1:
        return diff if diff.endswith("\n") else diff + "\n"
    return json.dumps(changes, indent=2, sort_keys=True, default=str) + "\n"


def _short(value: Any) -> str:
    text = "; ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text.strip()[:500]
