"""One Salt job: each host's plan as the Salt calls it takes, published and followed to the end.

masters/backends/salt.py (the backend) makes a `SaltJob` per job; its module docstring tells how a job
runs. Here also what each step becomes (`SaltJob._step`), and the same told for a dry run (`preview_lines`),
kept side by side so that the two stay alike. Reading the minions' replies is salt_replies.py's.
Salt itself is imported only by salt.py: the job is handed a LocalClient (`SaltClient` below).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

from ombot.masters.backends import ansible_snippets as snippets
from ombot.masters.backends import agent_setup, put_file, salt_copy
from ombot.masters.backends.ansible_play import PlanError, put_data, put_label, tmp_prefix
from ombot.masters.backends.base import CappedText, HostResult, HostStatus, RunContext
from ombot.masters.backends.salt_replies import (
    StepFailed, Call, HostRun, ok_or_fail, put_reply, ran, Reply, state_run, tail_reply,
)
from ombot.modules import (
    AgentSetup, Arg, Command, Emit, FirstAvailable, Ping, Plan, PutFile, RequireWithin, SaltState, Shell, Step, TailFile,
    TempPath,
)
from ombot.config import SaltSettings

log = logging.getLogger("ombot.master.salt")

EVENT_WAIT_SECONDS = 0.1  # how long one wait on the event bus lasts: the bound on reacting to a cancel
LAST_ASK_SECONDS = 2.0  # at the deadline, how long minions that never answered get to say they run the job
PUBLISH_TIMEOUT_SECONDS = 10  # the salt-master must take a publish this soon
TMP_ROOT = "/tmp"  # where the job's temporary directory is made on each minion (as STOP_JOB looks for it)
# argv: PATH ; a fresh private directory (fails if anything is already there, so nothing planted is used)
MKDIR = "import os, sys\nos.mkdir(sys.argv[1], 0o700)\n"
CHECK_SKIP = "check: not run (Salt cannot tell what it would do): "


class SaltClient(Protocol):
    """What a job uses of Salt's `salt.client.LocalClient`: publishing, and the master's event bus."""

    event: Any  # salt.utils.event.MasterEvent: get_event(), close_pub()
    opts: dict[str, Any]  # the salt-master's config as the client read it

    def run_job(self, tgt: Any, fun: str, **kwargs: Any) -> Any:
        """Publish `fun` to the minions `tgt`; {"jid": ..., "minions": [...]} or empty."""


class SaltJob:
    """One job: publishes each host's next call, feeds returns back, watches silent minions."""

    def __init__(self, ctx: RunContext, client: SaltClient, tuning: SaltSettings) -> None:
        self.ctx, self.client, self.tuning = ctx, client, tuning
        self.hosts = {h: HostRun(h, CappedText(ctx.output_cap), CappedText(ctx.output_cap)) for h in ctx.hosts}
        self.ident = re.sub(r"[^A-Za-z0-9_.-]", "_", ctx.job_id)[:64]
        # Each host's temporary directory: unguessable, and distinct per minion (minions may share a /tmp).
        self.tmp = f"{TMP_ROOT}/{tmp_prefix(self.ident)}{secrets.token_hex(8)}-"
        self.waiting: dict[str, list[HostRun]] = {}  # jid -> hosts whose call it is
        self.asking: dict[str, list[HostRun]] = {}  # find_job jid -> hosts asked
        self.env = {"PATH": snippets.CHILD_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMBOT_JOB_ID": ctx.job_id}
        self.copying = False  # walking the hosts through the wheels' copy, not their plans

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            copy = salt_copy.wheel_copy(self.ctx.plan, self.ctx.check, self.client.opts)
            if copy is not None:  # an install's wheels first, to each batch of hosts at once (salt_copy.py)
                self._walk(list(self.hosts.values()), copy.program, together=True)
            self._walk([h for h in self.hosts.values() if not h.reported], self._program, together=False)
        finally:
            for host in self.hosts.values():
                if not host.reported:  # a bug in the loop must cost the hosts, loudly, not leave them unreported
                    self._finish(host, HostStatus.FAILED, "backend error: the job ended without this host's result")

    def _walk(self, queue: list[HostRun], program: Callable[[HostRun], Generator[Call, Reply, None]],
              together: bool) -> None:
        """Each host of `queue` through `program`, at most max_parallel_hosts at once. `together`: as batches,
        each call published once for the batch when all of it is ready (a failed host drops out); a host
        at the end of the copy is not reported (its plan follows)."""
        self.copying = together
        active: list[HostRun] = []
        while queue or active:
            if self._stopped():
                self._stop(active, queue)
                return
            if not (together and active):  # together: the next batch once this one is done
                while queue and len(active) < self.ctx.max_parallel:
                    host = queue.pop(0)
                    active.append(host)
                    host.program = program(host)
                    self._advance(host, None)
            active = [h for h in active if not h.reported and h.program is not None]
            ready = [h for h in active if h.call is not None]
            if ready and (len(ready) == len(active) or not together):
                self._publish(ready)
            self._read_events(max(0.001, min(EVENT_WAIT_SECONDS, self.ctx.remaining())))
            self._watch_silent([h for h in active if h.jid is not None])
            active = [h for h in active if not h.reported and h.program is not None]

    def _stopped(self) -> bool:
        return self.ctx.cancelled.is_set() or self.ctx.remaining() <= 0

    def _publish(self, ready: list[HostRun]) -> None:
        groups: dict[str, list[HostRun]] = {}
        for host in ready:
            assert host.call is not None
            groups.setdefault(host.call.key, []).append(host)
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

    def _send(self, names: list[str], call: Call) -> tuple[str | None, Any]:
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
                self._advance(host, Reply(data.get("return"), retcode if isinstance(retcode, int) else None))
                return

    def _watch_silent(self, busy: list[HostRun]) -> None:
        """Ask minions silent for answer_seconds whether they run the job; unreachable if they do not say."""
        now, limit = time.monotonic(), self.tuning.answer_seconds
        ask: dict[str, list[HostRun]] = {}
        for host in busy:
            if host.asked is not None and now - host.asked_at > limit:
                self._finish(host, HostStatus.UNREACHABLE, f"the minion did not answer within {limit:g} s")
            elif host.asked is None and now - host.waiting_since > limit:
                assert host.jid is not None
                ask.setdefault(host.jid, []).append(host)
        for jid, hosts in ask.items():
            self._ask(jid, hosts)

    def _ask(self, jid: str, hosts: list[HostRun]) -> None:
        asked, _ = self._send([h.name for h in hosts], Call("saltutil.find_job", {"jid": jid}))
        for host in hosts:
            host.asked, host.asked_at = asked or "", time.monotonic()
        if asked is not None:
            self.asking[asked] = hosts

    def _last_word(self, hosts: list[HostRun]) -> None:
        """At the deadline, briefly ask the minions that never answered whether they run the job: a busy
        minion is then timed out, and only a silent one unreachable."""
        groups: dict[str, list[HostRun]] = {}
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

    def _stop(self, active: list[HostRun], queue: list[HostRun]) -> None:
        """Cancel or deadline: end what the job runs on its minions, report every unfinished host."""
        cancelled = self.ctx.cancelled.is_set()
        unheard = [h for h in active if not h.reported and not h.heard and h.jid is not None]
        if unheard and not cancelled:
            self._last_word(unheard)
        busy = [h.name for h in active if not h.reported and h.jid is not None]
        if busy:  # fire and forget: ends every process carrying this job's id, removes its temp dir
            self._send(busy, Call("cmd.run_all", self._snippet(snippets.STOP_JOB, [self.ctx.job_id,
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

    def _advance(self, host: HostRun, reply: Reply | None) -> None:
        """Feed the host's program its last reply; keep its next call, or report it when it ends."""
        assert host.program is not None
        try:
            host.call = next(host.program) if reply is None else host.program.send(reply)
        except StopIteration:
            host.program = None
            if not self.copying:  # after the wheels' copy the host goes on to its plan
                self._finish(host, HostStatus.OK, None)
        except StepFailed as exc:
            host.rc = exc.rc if exc.rc is not None else host.rc
            self._finish(host, HostStatus.FAILED, str(exc))
        except Exception as exc:  # a surprise in one return must cost that host, not the job
            log.exception("job %s: could not carry out the plan on %s", self.ctx.job_id, host.name)
            self._finish(host, HostStatus.FAILED, f"backend error: {type(exc).__name__}")

    def _finish(self, host: HostRun, status: HostStatus, error: str | None) -> None:
        if host.reported:
            return
        host.reported, host.status, host.error = True, status, error
        if host.tmp:  # given up on mid-plan: remove its temporary directory, without waiting
            self._send([host.name], Call("file.remove", {"path": host.tmp}))
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

    def _program(self, host: HostRun) -> Generator[Call, Reply, None]:
        """The host's plan as the Salt calls it takes, in order; each yield is one call and its reply."""
        steps = self.ctx.plan.steps
        if not any(contacts(step) for step in steps):
            ok_or_fail((yield Call("test.ping", {})), "test.ping")  # an unreachable minion is reported so, even for echo
        tmp = self.ctx.plan.uses_temp_path()
        if tmp:
            host.tmp = self.tmp + re.sub(r"[^A-Za-z0-9_.-]", "_", host.name)
            ran((yield Call("cmd.run_all", self._snippet(MKDIR, [host.tmp]))), host, "the temporary directory",
                 quiet=True)
        failed: StepFailed | None = None
        try:
            for step in steps:
                yield from self._step(step, host)
        except StepFailed as exc:
            failed = exc
        if tmp:  # after a failed step too; a host given up on gets it from _finish
            yield Call("file.remove", {"path": host.tmp})
            host.tmp = ""
        if failed is not None:
            raise failed

    def _step(self, step: Step, host: HostRun) -> Generator[Call, Reply, None]:
        check = self.ctx.check
        match step:
            case Emit(text):
                host.out.write(text.encode() + b"\n")
            case Ping():
                ok_or_fail((yield Call("test.ping", {})), "test.ping")
                host.out.write(b"pong\n")
            case Command() | Shell() if check:
                host.out.write(f"{CHECK_SKIP}{Plan(step).describe()[0]}\n".encode())
            case Command():
                ran((yield self._command(step, host)), host, str(step.argv[0]))
            case Shell(cmd):
                ran((yield Call("cmd.run_all", {"cmd": cmd, "python_shell": True, "shell": "/bin/sh",
                                                  **self._cmd_options()})), host, "/bin/sh")
            case FirstAvailable(commands):
                probe = yield Call("cmd.run_all", self._snippet(snippets.FIRST_INSTALLED,
                                                                 [str(c.argv[0]) for c in commands]))
                chosen = commands[int(ran(probe, host, "the program check", quiet=True).strip())]
                if check:
                    host.out.write(f"{CHECK_SKIP}{Plan(chosen).describe()[0]}\n".encode())
                else:
                    ran((yield self._command(chosen, host)), host, str(chosen.argv[0]))
            case PutFile():
                put_reply((yield self._put_file(step, host)), host, self._arg(step.dest, host), check)
            case RequireWithin(path, roots, param):
                ran((yield Call("cmd.run_all", self._snippet(snippets.REQUIRE_WITHIN, [_label(param), path,
                                                                                        *roots]))),
                     host, "the path check", quiet=True)
            case TailFile(path, lines, roots, param):
                reply = yield Call("cmd.run_all", self._snippet(snippets.TAIL, [
                    _label(param), path, str(lines), str(self.ctx.output_cap), *roots]))
                tail_reply(reply, host)
            case SaltState(name):
                state_run((yield Call("state.apply", {"mods": name, "test": check, "queue": False})), host, check)
            case AgentSetup():
                ran((yield self._agent_setup(step, host)), host, f"the agent's setup ({step.python})")
            case _:
                raise StepFailed(f"the salt backend cannot run {type(step).__name__}")

    def _cmd_options(self) -> dict[str, Any]:
        # Output keeps its trailing newlines; request data is never written to the minion's log; stdin
        # arrives as sent (Salt otherwise turns each backslash-n in it into a newline: JSON breaks).
        return {"env": self.env, "rstrip": False, "output_loglevel": "quiet", "ignore_retcode": True,
                "bg": False, "stdin_raw_newlines": True}

    def _command(self, step: Command, host: HostRun) -> Call:
        kwarg: dict[str, Any] = {"cmd": [self._arg(a, host) for a in step.argv], "python_shell": False,
                                 **self._cmd_options()}
        if step.stdin is not None:
            kwarg["stdin"] = step.stdin
        return Call("cmd.run_all", kwarg)

    def _snippet(self, code: str, args: list[str]) -> dict[str, Any]:
        return {"cmd": [self.tuning.python, "-c", code, *args], "python_shell": False, **self._cmd_options()}

    def _arg(self, arg: Arg, host: HostRun) -> str:
        return f"{host.tmp}/{arg.name}" if isinstance(arg, TempPath) else arg

    def _agent_setup(self, step: AgentSetup, host: HostRun) -> Call:
        """agent_setup.py run by the minion's own interpreter (`step.python`), with the minion's name
        (the master's inventory name for it) as its argument and the request on stdin. An install's
        wheels are in place already: `run` copied them first (salt_copy.py)."""
        if step.payload is None:
            raise StepFailed("the master filled in no agent payload (AgentSetup is the built-in audit modules' own)")
        return Call("cmd.run_all", {"cmd": [step.python, "-c", agent_setup.source(), host.name], "python_shell": False,
                                     **self._cmd_options(), "stdin": step.payload})

    def _put_file(self, step: PutFile, host: HostRun) -> Call:
        """put_file.py run on the minion: the path check and the write in one step, by descriptors; the
        content base64 on stdin (a keyword argument, never in a shell string)."""
        try:
            data = put_data(step, self.ctx.file_store)
        except PlanError as exc:
            raise StepFailed(str(exc)) from None
        args = put_file.arguments(step.mode, step.owner, step.group, step.roots, _label(step.param), self.ctx.check,
                                  put_label(step))
        return Call("cmd.run_all", {**self._snippet(put_file.source(), [self._arg(step.dest, host), *args]),
                                     "stdin": put_file.stdin(data)})


# -- what the plan needs ---------------------------------------------------------------------


def contacts(step: Step) -> bool:
    """Whether the step reaches the minions (an Emit is the master's own output)."""
    return not isinstance(step, Emit)


def preview_lines(step: Step, check: bool) -> list[str]:
    """What the step will ask of the minions, for the preview."""
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
        case AgentSetup():
            return [*salt_copy.preview_line(step, check),
                    f"cmd.run_all [{step.python}, -c, AGENT_SETUP, MINION] (the request on stdin): "
                    f"{Plan(step).describe()[0]}" + (" (check: changes nothing)" if check else "")]
    return [f"(cannot run {type(step).__name__})"]


def _label(param: str | None) -> str:
    return f"{param}: " if param else ""
