"""The auditd layer (issue 11, capture): the raw-log reader on sample lines in auditd's own format
(hex arguments, events of many records, interleaving, rotation, a restart), and, where auditd can
run (root, `auditctl -s` works), the real thing: the rules installed, a login through a
PAM-enabled sshd (pam_loginuid sets the login uid the rules key on), its commands - evasions of the
shell hook included - arriving at a real master as auditd events, and the rules removed after (only
those the test loaded: rules a real install had loaded before stay loaded, and a running auditd is
used, never replaced).

Needs auditd and openssh-server (`apt-get install -y auditd openssh-server`; .ci/run installs
them); the live tests skip, saying why, where the kernel or the container refuses auditing."""

from __future__ import annotations

import getpass
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ombot.audit_agent import auditd, auditd_rules
from ombot.audit_agent.agent import Agent
from ombot.audit_agent.auditd import AuditLog, decode, parse_line
from ombot.audit_agent.queue import EventQueue
from ombot.audit_agent.settings import AgentSettings, MasterAddress
from ombot.keys import Identity
from tests.rigs import HOST, AgentProcess, agent_cluster, stored
from tests.shells import Unavailable, isolated_argv, login_files
from tests.support import Cluster, child_env, wait_for

BOOT = "b00710ad-0000-4000-8000-000000000001"
T0 = int(time.time())  # the records' clock (seconds): after this boot, or the reader takes them for older ones


# -- sample lines, as auditd 3.0.9 writes them (log_format = ENRICHED) ------------------------------------


def hexed(text: str) -> str:
    return text.encode().hex().upper()


def arg(value: str) -> str:
    """How auditd writes one argument: quoted when plain, hex when it holds a space, quote or non-ASCII."""
    return f'"{value}"' if re.fullmatch(r"[!#-~]*", value) and value else hexed(value)


def event_lines(serial: int, argv: list[str], *, key: str = "ombot", success: str = "yes", exit_code: int = 0,
                auid: int = 1000, uid: int = 1000, cwd: str = "/home/alice", tty: str = "pts3",
                ms: int = 509) -> list[str]:
    head = f"msg=audit({T0}.{ms:03d}:{serial}):"
    comm = os.path.basename(argv[0])[:15]
    lines = [
        f"type=SYSCALL {head} arch=c000003e syscall=59 success={success} exit={exit_code} a0=5623f134f5c0 "
        f"a1=5623f1341fc0 a2=5623f134c890 a3=8 items=2 ppid=13951 pid={20000 + serial} auid={auid} uid={uid} "
        f"gid={uid} euid={uid} suid={uid} fsuid={uid} egid={uid} sgid={uid} fsgid={uid} tty={tty} ses=7 "
        f'comm="{comm}" exe="/usr/bin/{comm}" key={arg(key) if key else "(null)"}'
        f'\x1dARCH=x86_64 SYSCALL=execve AUID="alice" UID="alice" GID="alice" EUID="alice"',
        f"type=BPRM_FCAPS {head} fver=0 fp=0 fi=0 fe=0 old_pp=000001fffeffffff old_pi=0 old_pe=000001fffeffffff "
        "old_pa=0 pp=000001fffeffffff pi=0 pe=000001fffeffffff pa=0 frootid=0",
    ]
    if success == "yes":
        lines.append(f"type=EXECVE {head} argc={len(argv)} " + " ".join(f"a{n}={arg(a)}" for n, a in enumerate(argv)))
    lines += [f"type=CWD {head} cwd={arg(cwd)}",
              f'type=PATH {head} item=0 name="{argv[0]}" inode=260249 dev=fe:00 mode=0100755 ouid=0 ogid=0 '
              'rdev=00:00 nametype=NORMAL cap_fp=0 cap_fi=0 cap_fe=0 cap_fver=0 cap_frootid=0'
              '\x1dOUID="root" OGID="root"',
              f"type=PROCTITLE {head} proctitle={hexed(chr(0).join(argv))[:200]}"]
    return lines


def long_arg_lines(serial: int, long: str) -> list[str]:
    """An argument over the kernel's 7500-byte piece: `a1_len` (hex characters), then a1[0], a1[1]...
    in EXECVE records of their own (captured from a real /bin/true with a 9000-character argument)."""
    head = f"msg=audit({T0}.700:{serial}):"
    pieces = [hexed(long)[i:i + 7500] for i in range(0, 2 * len(long), 7500)]
    lines = event_lines(serial, ["/bin/true", "x"], ms=700)
    execve = [f'type=EXECVE {head} argc=4 a0="/bin/true" a1_len={2 * len(long)} a1[0]={pieces[0]}']
    execve += [f"type=EXECVE {head}  a1[{i}]={p}" for i, p in enumerate(pieces[1:], 1)]
    execve[-1] += f" a2={hexed(QUOTED)} a3={hexed('café')}"
    return lines[:2] + execve + lines[3:]


QUOTED = 'q"uote'


OTHER_RECORDS = [  # a login's records, not syscall events: never shipped
    f"type=USER_LOGIN msg=audit({T0}.100:5): pid=1 uid=0 auid=1000 ses=7 msg='op=login acct=\"alice\" "
    "exe=\"/usr/sbin/sshd\" hostname=? addr=127.0.0.1 terminal=/dev/pts/3 res=success'\x1dUID=\"root\"",
    f"type=DAEMON_START msg=audit({T0}.000:4124): op=start ver=3.0.9 format=enriched auid=4294967295 pid=1 "
    "uid=0 ses=4294967295 res=success\x1dAUID=\"unset\" UID=\"root\"",
]


def write(path: Path, lines: list[str], mode: str = "a") -> None:
    with open(path, mode) as f:
        f.write("".join(line + "\n" for line in lines))


def read_all(reader: AuditLog) -> list[tuple[str, str, int, dict[str, Any]]]:
    return [e for chunk in reader.poll() for e in chunk.events]


# -- the parser and reader, on sample lines -----------------------------------------------------------------


def test_values_decode_as_auditd_encodes_them() -> None:
    assert decode('"/usr/bin/ls"') == "/usr/bin/ls"
    assert decode("612062") == "a b" and decode(hexed("caf\u00e9 \x01")) == "caf\u00e9 \x01"
    assert decode("(null)") is None and decode("(none)") is None
    record = parse_line(event_lines(9, ["ls"])[0])
    assert record is not None and (record.type, record.sec, record.ms, record.serial) == ("SYSCALL", T0, 509, 9)
    assert record.fields["auid"] == "1000" and "AUID" not in record.fields  # the enriched part is not read
    assert parse_line("not an audit record") is None


def test_events_are_assembled_decoded_and_filtered(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    a, b = event_lines(190, ["/bin/echo", "a b", "x"]), event_lines(191, ["cat", "/etc/shadow"], tty="(none)")
    interleaved = [a[0], b[0], a[1], b[1], a[2], b[2], b[3], a[3], a[4], b[4], b[5], a[5]]  # two CPUs at once
    write(log, OTHER_RECORDS + interleaved
          + event_lines(192, ["ls"], key="")  # another rule's event (no key): not ours
          + event_lines(193, ["/usr/local/sbin/run-parts"], success="no", exit_code=-2)  # a $PATH miss: skipped
          + event_lines(194, ["/etc/secret.sh"], success="no", exit_code=-13)  # refused: kept, with its errno
          + event_lines(195, ["id"], key="ombot\x01other")  # a rule with two keys
          + long_arg_lines(196, "L" * 9000))
    events = read_all(AuditLog(log, HOST, BOOT, {}, tmp_path / "state"))
    by_serial = {e[3]["serial"]: e for e in events}
    assert sorted(by_serial) == [190, 191, 194, 195, 196]
    eid, kind, at, echo = by_serial[190]
    assert (eid, kind, at) == (f"{HOST}:{BOOT}:auditd:190", "command", T0 * 1000 + 509)
    assert echo["command"] == "/bin/echo a b x" and echo["argv"] == ["/bin/echo", "a b", "x"]
    assert echo["source"] == "auditd" and echo["login_uid"] == 1000 and echo["uid"] == 1000
    assert echo["cwd"] == "/home/alice" and echo["tty"] == "/dev/pts/3" and echo["session"] == 7
    assert echo["exit"] is None and echo["success"] is True and echo["exe"] == "/usr/bin/echo"
    assert by_serial[191][3]["tty"] is None and by_serial[191][3]["command"] == "cat /etc/shadow"
    refused = by_serial[194][3]
    assert refused["success"] is False and refused["errno"] == 13 and refused["command"] == "/etc/secret.sh"
    long = by_serial[196][3]
    assert long["truncated"] and long["command"].startswith("/bin/true " + "L" * 100)
    assert len(long["command"]) == auditd.MAX_COMMAND_CHARS and "argv" not in long


def test_a_long_argument_and_quotes_come_back_whole(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(log, long_arg_lines(300, "L" * 1500))
    write(log, long_arg_lines(301, "M" * 200))
    long, short = (e[3] for e in read_all(AuditLog(log, HOST, BOOT, {}, tmp_path / "state")))
    assert long["command"] == "/bin/true " + "L" * 1500 + ' q"uote café' and not long["truncated"]
    assert "argv" not in long  # too long to carry twice
    assert short["argv"] == ["/bin/true", "M" * 200, 'q"uote', "café"]


def test_a_partial_event_waits_for_its_last_record(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    lines = event_lines(400, ["ls", "-l"])
    write(log, lines[:3])
    with open(log, "a") as f:
        f.write(lines[3][:20])  # auditd is in the middle of writing this line
    reader = AuditLog(log, HOST, BOOT, {}, tmp_path / "state")
    chunks = list(reader.poll())
    assert [e for c in chunks for e in c.events] == []
    assert chunks[0].offset == 0  # the unfinished event's first line: where a restart must read again
    with open(log, "a") as f:
        f.write(lines[3][20:] + "\n" + "\n".join(lines[4:]) + "\n")
    chunks = list(reader.poll())
    assert [e[3]["command"] for c in chunks for e in c.events] == ["ls -l"]
    assert chunks[0].offset == log.stat().st_size


def test_rotation_and_a_restart_lose_and_repeat_nothing(tmp_path: Path) -> None:
    """Through the agent's own collect and queue: auditd renames audit.log to audit.log.1 (and .1
    to .2) while the agent is down; it finishes the file it knew, reads the newer ones whole, and
    after a restart reads nothing twice."""
    logs = tmp_path / "log"
    logs.mkdir()
    log = logs / "audit.log"
    write(log, event_lines(1, ["one"]) + event_lines(2, ["two"]))
    agent = make_agent(tmp_path, log)
    assert agent.collect() == 2
    write(log, event_lines(3, ["three"]))
    agent.queue.close()  # the agent stops; auditd rotates twice meanwhile
    log.rename(logs / "audit.log.1")
    write(log, event_lines(4, ["four"]))
    (logs / "audit.log.1").rename(logs / "audit.log.2")
    log.rename(logs / "audit.log.1")
    write(log, event_lines(5, ["five"]))
    write(logs / "audit.log.9", event_lines(99, ["old"]))  # older than any file it knew: read before
    agent = make_agent(tmp_path, log)
    assert agent.collect() == 3
    agent.queue.close()
    first = key_of(logs / "audit.log.2")
    (logs / "audit.log.2").unlink()  # rotated out of existence: its offset is forgotten
    write(log, event_lines(6, ["six"]))
    agent = make_agent(tmp_path, log)
    assert agent.collect() == 1 and agent.collect() == 0
    assert agent.auditd is not None and key_of(logs / "audit.log.9") not in agent.auditd.positions
    assert agent.queue.offset(first) == 0 and agent.queue.offset(key_of(log)) == log.stat().st_size
    batch = agent.queue.batch(100, 1 << 20)
    assert [e["data"]["command"] for e in batch] == ["one", "two", "three", "four", "five", "six"]
    assert [e["id"] for e in batch] == [f"{HOST}:{agent.queue.boot_id}:auditd:{n}" for n in range(1, 7)]
    assert agent.queue.done([batch[0]["id"], batch[1]["id"]]) == 2 and agent.queue.depth() == 4
    # the state lost, the log read again from the start: the same ids, so nothing is queued twice
    write(log, event_lines(7, ["seven"]))
    agent.queue.add_identified(read_all(AuditLog(log, HOST, agent.queue.boot_id, {}, tmp_path / "state")))
    assert sorted(e["data"]["command"] for e in agent.queue.batch(100, 1 << 20)) == \
        ["five", "four", "old", "seven", "six", "three"]


def test_records_from_before_this_boot_keep_their_boot(tmp_path: Path) -> None:
    """The kernel numbers events per boot: records still in the log from the boot before get that
    boot's id (remembered by the agent), so they never collide with this boot's serials."""
    log = tmp_path / "audit.log"
    write(log, event_lines(5, ["old"]))
    state = tmp_path / "state"
    AuditLog(log, HOST, "aaaa", {}, state)  # the agent ran in boot aaaa
    reader = AuditLog(log, HOST, "bbbb", {}, state)  # rebooted: this is bbbb, booted after T0
    reader.boot_time = T0 + 60
    (event,) = read_all(reader)
    assert event[0] == f"{HOST}:aaaa:auditd:5"


LAUREL_LINE = (  # as LAUREL 0.5.1 writes an event (captured; ids as in the sample above, the ld.so PATH
    # item and BPRM_FCAPS left out)
    '{"ID":"' + f"{T0 + 889}" + '.677:2190","SYSCALL":{"arch":"0xc000003e","syscall":59,"success":"yes","exit":0,"items":2,'
    '"ppid":13951,"pid":22190,"auid":1000,"uid":1000,"gid":1000,"euid":1000,"suid":1000,"fsuid":1000,"egid":1000,'
    '"sgid":1000,"fsgid":1000,"tty":"pts3","ses":7,"comm":"echo","exe":"/usr/bin/echo","key":"ombot",'
    '"ARCH":"x86_64","SYSCALL":"execve","AUID":"alice","UID":"alice","ARGV":["0x55e3e91245e0","0x55e3e9124910"],'
    '"PPID":{"EVENT_ID":"' + f"{T0 + 888}" + '.985:2018","comm":"bash","exe":"/usr/bin/bash","ppid":16529},'
    '"PID":{"EVENT_ID":"' + f"{T0 + 889}" + '.677:2190"}},"EXECVE":{"argc":3,"ARGV":["/bin/echo","a b","x"],"ENV":{}},'
    '"CWD":{"cwd":"/home/alice"},"PATH":[{"item":0,"name":"/bin/echo","inode":260249,"dev":"fe:00",'
    '"mode":"0o100755","ouid":0,"ogid":0,"rdev":"00:00","nametype":"NORMAL"}],'
    '"PROCTITLE":{"ARGV":["/bin/echo","a b","x"]}}'
)


def test_laurel_json_lines_give_the_same_events(tmp_path: Path) -> None:
    """The same reader takes LAUREL's JSON lines (a line starting with "{"): set auditd_log to
    LAUREL's log instead. One line is one whole event; the data is the raw log's."""
    laurel, raw = tmp_path / "laurel.log", tmp_path / "audit.log"
    other_key = LAUREL_LINE.replace('"key":"ombot"', '"key":["other","ombot"]').replace(":2190", ":2191")
    not_ours = LAUREL_LINE.replace('"key":"ombot"', '"key":null').replace(":2190", ":2192")
    write(laurel, [LAUREL_LINE, other_key, not_ours, '{"ID":"x"}', "{broken"])
    write(raw, [line.replace(f"{T0}.509:2190", f"{T0 + 889}.677:2190")
                for line in event_lines(2190, ["/bin/echo", "a b", "x"])])
    events = read_all(AuditLog(laurel, HOST, BOOT, {}, tmp_path / "state"))
    assert [e[0] for e in events] == [f"{HOST}:{BOOT}:auditd:2190", f"{HOST}:{BOOT}:auditd:2191"]
    (from_raw,) = read_all(AuditLog(raw, HOST, BOOT, {}, tmp_path / "state"))
    assert events[0][:3] == from_raw[:3]
    assert events[0][3] == from_raw[3]
    assert events[0][3]["argv"] == ["/bin/echo", "a b", "x"] and events[0][3]["tty"] == "/dev/pts/3"


def test_the_rules_text_never_locks() -> None:
    text = auditd_rules.rules_text()
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rules == list(auditd_rules.RULES) and len(rules) == 2
    assert all("-S execve" in r and "auid!=unset" in r and r.endswith("-k ombot") for r in rules)
    assert {r.split("arch=")[1].split()[0] for r in rules} == {"b64", "b32"}
    assert "-e 2" not in text.replace("Never -e 2", "") and "-e" not in " ".join(rules).split()


def key_of(path: Path) -> str:
    st = path.stat()
    return f"auditd:{st.st_dev}:{st.st_ino}"


def test_the_cli_writes_and_removes_the_rules_file(tmp_path: Path) -> None:
    """--no-load: only the file (an image build, or where the kernel refuses auditing)."""
    root = tmp_path / "root"
    written = run_cli("install", "--auditd", "--no-load", "--root", str(root))
    assert written.returncode == 0, written.stderr
    assert (root / auditd_rules.RULES_FILE).read_text() == auditd_rules.rules_text()
    assert oct((root / auditd_rules.RULES_FILE).stat().st_mode & 0o777) == "0o640"
    removed = run_cli("install", "--auditd", "--remove", "--no-load", "--root", str(root))
    assert removed.returncode == 0 and not (root / auditd_rules.RULES_FILE).exists()
    alone = run_cli("install", "--remove", "--root", str(root))
    assert alone.returncode == 2 and "--auditd" in alone.stderr
    assert not (root / "etc" / "profile.d").exists()  # --remove alone installed no hook either


def make_agent(tmp_path: Path, log: Path) -> Agent:
    key = tmp_path / "agent.key"
    if not key.exists():
        Identity.generate().save(key)
    settings = AgentSettings(path=tmp_path / "agent.toml", host=HOST, idc="local", key_file=key,
                             masters=(MasterAddress("m1", "127.0.0.1", 9, Identity.generate().public),),
                             spool_dir=tmp_path / "spool", state_dir=tmp_path / "state", auditd_log=log)
    return Agent(settings)


# -- the real thing: auditd, a PAM login, a master ------------------------------------------------------------


def _why_auditd_cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "loading audit rules needs root"
    if any(shutil.which(tool, path="/usr/sbin:/sbin") is None for tool in ("auditctl", "auditd")):
        return "auditd is not installed (apt-get install -y auditd)"
    if shutil.which("sshd", path="/usr/sbin:/sbin") is None or not Path("/etc/pam.d/sshd").exists():
        return "openssh-server (with its PAM config) is not installed"
    try:
        state = auditd_rules.status()
    except auditd_rules.AuditdError as exc:
        return f"the kernel refuses auditing here: {exc}"
    if state.get("enabled") == "2":
        return "the audit rules are locked (enabled 2) on this machine"
    if "pam_loginuid" not in Path("/etc/pam.d/sshd").read_text():
        return "/etc/pam.d/sshd does not run pam_loginuid: logins get no login uid"
    return None


WHY_NOT_LIVE = _why_auditd_cannot_run()
live = pytest.mark.skipif(WHY_NOT_LIVE is not None, reason=str(WHY_NOT_LIVE))


@dataclass
class AuditLogs:
    raw: Path  # auditd's own log
    laurel: Path | None  # LAUREL's JSON lines, when this test runs LAUREL as auditd's plugin


LAUREL = shutil.which("laurel", path="/usr/sbin:/usr/bin:/sbin")
AUDITCTL = shutil.which("auditctl", path="/usr/sbin:/sbin") or "auditctl"


@pytest.fixture
def audit_logs(tmp_path: Path) -> Iterator[AuditLogs]:
    """The logs to read: the running auditd's, or those of an auditd started here (with its own
    configuration, log and, where LAUREL is installed, LAUREL as its plugin) and stopped after.
    A running (foreign) auditd is looked for first and only read. Auditing is left enabled or not as
    it was found: `auditctl -e` runs only if the test's auditd changed it."""
    before = auditd_rules.status()
    if before.get("pid", "0") != "0":  # the machine's own auditd: read its log, leave it alone
        conf = Path("/etc/audit/auditd.conf").read_text()
        match = re.search(r"^\s*log_file\s*=\s*(\S+)", conf, re.M)
        yield AuditLogs(Path(match[1] if match else auditd.DEFAULT_LOG), None)
        return
    conf_dir = tmp_path / "auditd"
    (conf_dir / "plugins.d").mkdir(parents=True)
    log = conf_dir / "log" / "audit.log"
    log.parent.mkdir(mode=0o700)  # auditd does not make it
    (conf_dir / "auditd.conf").write_text("\n".join([
        "local_events = yes", "write_logs = yes", f"log_file = {log}", "log_format = ENRICHED",
        "flush = INCREMENTAL_ASYNC", "freq = 1", "max_log_file = 8", "num_logs = 2", "max_log_file_action = ROTATE",
        "space_left = 2", "space_left_action = IGNORE", "admin_space_left = 1", "admin_space_left_action = IGNORE",
        "disk_full_action = IGNORE", "disk_error_action = IGNORE", f"plugin_dir = {conf_dir / 'plugins.d'}",
        "end_of_event_timeout = 2", ""]))
    os.chmod(conf_dir / "auditd.conf", 0o600)
    laurel = None
    if LAUREL is not None:
        laurel = conf_dir / "laurel" / "audit.log"
        laurel.parent.mkdir()
        (conf_dir / "laurel.toml").write_text("\n".join([
            f'directory = "{laurel.parent}"', 'user = "root"', "statusreport-period = 0", "[auditlog]",
            'file = "audit.log"', "size = 5000000", "generations = 2", "[transform]", 'execve-argv = [ "array" ]', ""]))
        (conf_dir / "plugins.d" / "laurel.conf").write_text("\n".join([
            "active = yes", "direction = out", "type = always", "format = string", f"path = {LAUREL}",
            f"args = --config {conf_dir / 'laurel.toml'}", ""]))
    daemon = subprocess.Popen([shutil.which("auditd", path="/usr/sbin:/sbin") or "auditd", "-n", "-c", str(conf_dir)],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "auditd.err", "ab"))
    try:
        wait_for(lambda: auditd_rules.status().get("pid") == str(daemon.pid) and log.exists(), within=20,
                 why="auditd to start: " + (tmp_path / "auditd.err").read_text(errors="replace"))
        yield AuditLogs(log, laurel)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=20)
        was = before.get("enabled")
        if was in ("0", "1") and auditd_rules.status().get("enabled") != was:
            subprocess.run([AUDITCTL, "-e", was], capture_output=True)  # as it was; never -e 2


@pytest.fixture
def ombot_rules(tmp_path: Path, audit_logs: AuditLogs) -> Iterator[Path]:
    """Our rules in the kernel for the test, and afterwards only what the test added taken out.

    After `audit_logs` (the auditd question first). What the kernel holds is recorded first: rules
    a real install on this machine had loaded are used as they are and left loaded (never
    `install --remove`, which unloads every rule keyed ombot). Otherwise they are installed through
    the CLI (under a test root: the real /etc is not touched) and removed the same way, whatever the
    test did; if only some were there, the test adds the rest and deletes just those."""
    root = tmp_path / "root"
    before = auditd_rules.loaded_arches()
    if before == set(auditd_rules.ARCHES):
        yield root
        assert auditd_rules.loaded_arches() == before  # still loaded, as found
        return
    installed = run_cli("install", "--auditd", "--root", str(root))
    assert installed.returncode == 0, installed.stderr
    added = auditd_rules.loaded_arches() - before
    try:
        assert auditd_rules.loaded_arches() == set(auditd_rules.ARCHES)
        yield root
    finally:
        if not before:  # all ours: removed as an operator removes them
            removed = run_cli("install", "--auditd", "--remove", "--root", str(root))
            assert removed.returncode == 0, removed.stderr
            assert auditd_rules.loaded_arches() == set() and not (root / auditd_rules.RULES_FILE).exists()
        else:  # some were the machine's: delete exactly the rules the test added, and the test's file
            for rule, arch in zip(auditd_rules.RULES, auditd_rules.ARCHES):
                if arch in added:
                    deleted = subprocess.run([AUDITCTL, *shlex.split(rule.replace("-a ", "-d ", 1))],
                                             capture_output=True, text=True)
                    assert deleted.returncode == 0, deleted.stderr
            removed = run_cli("install", "--auditd", "--remove", "--no-load", "--root", str(root))
            assert removed.returncode == 0, removed.stderr
            assert auditd_rules.loaded_arches() == before


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ombot.audit_agent", *args], env=child_env(), capture_output=True, text=True)


class PamSshd:
    """One sshd on loopback with UsePAM yes: a login runs /etc/pam.d/sshd, whose pam_loginuid sets
    the session's login uid (tests/sshd.py's hosts run without PAM, so theirs stays unset).

    It runs in a private mount namespace (tests/shells.py) where no shell rc file of this machine is
    read: a session's `bash -c` reads /etc/bash.bashrc and ~/.bashrc on Debian (its bash is built to,
    for shells started by sshd), so the machine's files, a hook in them included, would run in it."""

    def __init__(self, root: Path) -> None:
        self.root, self.user = root, getpass.getuser()
        root.mkdir(parents=True, exist_ok=True)
        self.key = root / "client_key"
        for path in (self.key, root / "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        (root / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        (root / "sshd.conf").write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}", f"HostKey {root / 'host_key'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", f"PidFile {root / 'sshd.pid'}", "StrictModes no",
            "UsePAM yes", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "LogLevel ERROR", f"AllowUsers {self.user}", ""]))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        try:
            argv = isolated_argv([shutil.which("sshd", path="/usr/sbin:/sbin") or "sshd", "-D", "-e", "-f",
                                  str(root / "sshd.conf")], login_files(Path(pwd.getpwnam(self.user).pw_dir)))
        except Unavailable as exc:
            pytest.skip(str(exc))
        self.proc = subprocess.Popen(argv, stderr=open(root / "sshd.log", "ab"))

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", "-i", str(self.key), "-p", str(self.port), "-o", "BatchMode=yes",
                               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                               "-o", "ConnectionAttempts=5", f"{self.user}@127.0.0.1", command],
                              capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@live
@pytest.mark.slow
def test_a_login_session_is_recorded_by_auditd_whatever_the_shell_does(
        tmp_path: Path, audit_logs: AuditLogs, ombot_rules: Path, make_cluster: Callable[..., Cluster]) -> None:
    cluster = agent_cluster(make_cluster)
    cluster.start("m1")
    agent = AgentProcess(cluster, tmp_path / "spool", tmp_path / "state", ["m1"])
    agent.config.write_text(f'auditd_log = "{audit_logs.raw}"\n' + agent.config.read_text())
    sshd = PamSshd(tmp_path / "sshd")
    token = uuid.uuid4().hex[:12]
    try:
        wait_for(lambda: sshd.run("true").returncode == 0, within=30, why="the PAM sshd to accept a login")
        # every trick that blinds the shell hook, then commands that start programs
        evasive = (f"bash --norc --noprofile -c 'unset PROMPT_COMMAND; trap - DEBUG; set +o history; "
                   f"/bin/echo evaded-{token} \"two words\"; exec /usr/bin/env true exec-{token}'")
        session = sshd.run(f"cat /proc/self/loginuid; echo; {evasive}")
        assert session.returncode == 0, session.stderr
        login_uid = int(session.stdout.split()[0])
        assert login_uid == os.getuid()  # pam_loginuid set it: the rules' auid filter matches
        agent.start()
        wanted = (f"/bin/echo evaded-{token} two words", f"/usr/bin/env true exec-{token}")
        wait_for(lambda: all(any(d.get("command") == w for _, _, d in stored(cluster)) for w in wanted), within=60,
                 why=f"the session's execve events at the master; agent log:\n{agent.log()}")
    finally:
        agent.stop()
        sshd.stop()
    rows = [(i, d) for i, k, d in stored(cluster) if k == "command" and d.get("source") == "auditd"]
    echo = next((i, d) for i, d in rows if d["command"] == wanted[0])
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert re.fullmatch(rf"{HOST}:{boot}:auditd:[0-9]+", echo[0]) and echo[0].endswith(f":{echo[1]['serial']}")
    data = echo[1]
    assert data["argv"] == ["/bin/echo", f"evaded-{token}", "two words"]  # hex-encoded in the log, exact here
    assert data["login_uid"] == login_uid and data["uid"] == os.getuid() and data["user"] == getpass.getuser()
    assert data["cwd"] == pwd.getpwuid(os.getuid()).pw_dir and data["exe"] == "/usr/bin/echo"
    assert data["session"] is not None and data["exit"] is None
    commands = [d["command"] for _, d in rows]
    assert commands.count(wanted[0]) == 1 and commands.count(wanted[1]) == 1
    inner = [d for _, d in rows if d.get("argv", [])[:2] == ["bash", "--norc"] and token in d["command"]]
    assert len(inner) == 1 and "unset PROMPT_COMMAND" in inner[0]["argv"][-1]  # the evasion itself is on record
    assert len({i for i, _ in rows}) == len(rows)  # each once
    # the hook's spool saw nothing of this: bash --norc is not armed, a kernel rule is
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").rglob("spool"))
    if audit_logs.laurel is not None:  # LAUREL's JSON lines of the same events: the same ids and data
        from_laurel = {e[0]: e[3] for e in read_all(AuditLog(audit_logs.laurel, HOST, boot, {}, tmp_path / "l"))}
        assert from_laurel[echo[0]] == data
