"""Shells for tests that read only what the test gives them.

An interactive bash reads /etc/bash.bashrc (Debian) and zsh reads /etc/zsh/zshenv and zshrc
whatever its flags: on a machine where OMBot's hook (or anything else) is installed, a test shell
spawned plainly carries the machine's rc files too. So every test shell runs in a private mount
namespace (`unshare --mount`) where the machine's global rc files are covered: the test's own file
bind-mounted over a path, an empty file over a file the test does not give, an empty read-only
tmpfs over such a directory. Paths the machine does not have stay absent. Nothing is written to
the machine's /etc; the covers vanish with the namespace.

- `isolated_argv(command, files, user=None)`: the argv that runs `command` so.
- `bash_files(root)` / `zsh_files(root)`: the covers for every global file bash -i / zsh -i may
  read, arming the shell with the test install root's hook where the machine's shell reads the
  same path (ROOT/etc/bash.bashrc is /etc/bash.bashrc; ROOT/etc/zsh is /etc/zsh).
- `Shell` (bash) and `Zsh`: an interactive shell in a pty (pexpect), spawned through the above.

As root the namespace is `unshare --mount --propagation private`; otherwise a user namespace maps
us to root for the mounts, and a nested one maps us back to our own uid before the command starts
(`mount` refuses a non-root uid, so `--map-current-user` alone cannot mount). Where neither works,
`Unavailable` says why; the classes turn that into a pytest skip.

Running as another user (root only): the mounts are made as root, then `setpriv` drops to the user
just before exec. That user must reach every file: the shell's home directory and the install root
need world-traversable parents. pytest's tmp_path is not (/tmp/pytest-of-root is 0700); use
`tempfile.mkdtemp()` and chmod it 0755:

    base = Path(tempfile.mkdtemp(prefix="ombot-test-")); base.chmod(0o755)
    root = base / "root"; hook.install(root)       # or `python -m ombot.audit_agent install --root`
    shell = Shell(root, base / "home", user="nobody")
    shell.run("id -u")                              # '65534', in a hooked shell
    shell.close(); shutil.rmtree(base)

The home directory is made (if needed) and given to that user; the rc files the class writes stay
root's, mode 0644.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pexpect

from ombot.audit_agent import hook

PROMPT = "PROMPT> "
ZPROMPT = "ZPROMPT> "
BASH = shutil.which("bash")
ZSH = shutil.which("zsh")
_SYS_PATH = "/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", "")
UNSHARE = shutil.which("unshare", path=_SYS_PATH)
MOUNT = shutil.which("mount", path=_SYS_PATH)
SETPRIV = shutil.which("setpriv", path=_SYS_PATH)
SH = shutil.which("sh", path=_SYS_PATH) or "/bin/sh"

# Every global file an interactive bash (login or not) may read, on any distribution: Debian's
# compiled-in bash.bashrc and bash.bash_logout, /etc/profile and what it sources, Fedora's bashrc
# (sourced from ~/.bashrc there), and readline's inputrc.
BASH_GLOBAL_FILES = ("/etc/bash.bashrc", "/etc/bash.bash_logout", "/etc/profile", "/etc/profile.d", "/etc/bashrc",
                     "/etc/inputrc")
# zsh: Debian's /etc/zsh/{zshenv,zprofile,zshrc,zlogin,zlogout} (the whole directory is covered)
# and the /etc/z* paths of other distributions.
ZSH_GLOBAL_FILES = ("/etc/zsh", "/etc/zshenv", "/etc/zprofile", "/etc/zshrc", "/etc/zlogin", "/etc/zlogout")

# The script run inside the namespace. Arguments: mount's path, the scratch mount point, then steps
# (`bind SOURCE TARGET`, `hide TARGET` for a file, `tmpfs TARGET` for a directory), `--`, and the
# command. Paths only ever arrive as arguments, never as shell text.
_SCRIPT = r"""
set -u
m=$1 scratch=$2; shift 2
fail() { echo "tests/shells.py: $*" >&2; exit 125; }
"$m" -t tmpfs -o mode=0755,size=16k ombot-test-scratch "$scratch" || fail "tmpfs on $scratch"
: > "$scratch/empty" && chmod 0444 "$scratch/empty" || fail "empty file"
"$m" -o remount,bind,ro "$scratch" || fail "remount $scratch read-only"
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
    case $1 in
        bind) "$m" --bind "$2" "$3" || fail "bind $2 over $3"; shift 3 ;;
        hide) "$m" --bind "$scratch/empty" "$2" || fail "hide $2"; shift 2 ;;
        tmpfs) "$m" -t tmpfs -o ro,mode=0755,size=4k ombot-test-empty "$2" || fail "tmpfs over $2"; shift 2 ;;
        *) fail "unknown step $1" ;;
    esac
done
[ "$#" -gt 1 ] || fail "no command"
shift
exec "$@"
"""


class Unavailable(RuntimeError):
    """No private mount namespace can be made here (or not the one asked for); the reason."""


def real_root() -> bool:
    """Root of the machine, not only uid 0 inside a user namespace (where setpriv cannot reach other uids)."""
    if os.geteuid() != 0:
        return False
    try:
        first = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return True
    return first[:3] == ["0", "0", "4294967295"]


_scratch_dir: str | None = None


def _scratch() -> str:
    """An empty directory of ours (0755): each namespace mounts its own tmpfs there to hold the empty
    file it binds over the files it hides. Removed when the process exits."""
    global _scratch_dir
    if _scratch_dir is None or not os.path.isdir(_scratch_dir):
        _scratch_dir = tempfile.mkdtemp(prefix="ombot-shells-")
        os.chmod(_scratch_dir, 0o755)
        atexit.register(shutil.rmtree, _scratch_dir, True)
    return _scratch_dir


_mode: tuple[str | None, str] | None = None  # (mode, why not) once probed


def namespace_mode() -> str:
    """How this process gets a private mount namespace: "root" (`unshare --mount`) or "user" (through a
    user namespace, for a non-root uid). Probed once, with a real mount; `Unavailable` if neither works."""
    global _mode
    if _mode is None:
        _mode = _probe()
    mode, why = _mode
    if mode is None:
        raise Unavailable(why)
    return mode


def _probe() -> tuple[str | None, str]:
    if UNSHARE is None or MOUNT is None:
        return None, "util-linux's unshare and mount are needed for a private mount namespace"
    tried = []
    for mode in (("root", "user") if os.geteuid() == 0 else ("user",)):
        argv = _argv(mode, ["true"], [], None)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{mode}: {exc}")
            continue
        if proc.returncode == 0:
            return mode, ""
        tried.append(f"{' '.join(argv[:6])} ...: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return None, "no private mount namespace for test shells here: " + "; ".join(tried)


def _argv(mode: str, command: Sequence[str], steps: list[str], user: pwd.struct_passwd | None) -> list[str]:
    assert UNSHARE is not None and MOUNT is not None
    if mode == "root":
        prefix = [UNSHARE, "--mount", "--propagation", "private"]
        if user is None:
            drop: list[str] = []
        else:
            if SETPRIV is None:
                raise Unavailable("setpriv (util-linux) is needed to run a shell as another user")
            drop = [SETPRIV, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
    else:  # mounts as the user namespace's root, then a nested namespace maps our own uid and gid back
        if user is not None:
            raise Unavailable(f"running a shell as {user.pw_name} needs a mount namespace made as root")
        prefix = [UNSHARE, "--user", "--map-root-user", "--mount", "--propagation", "private"]
        drop = [UNSHARE, "--user", f"--map-user={os.getuid()}", f"--map-group={os.getgid()}", "--"]
    return [*prefix, "--", SH, "-c", _SCRIPT, "isolated", MOUNT, _scratch(), *steps, "--", *drop, *command]


def isolated_argv(command: Sequence[str], files: Mapping[str, str | os.PathLike[str] | None],
                  user: str | int | None = None) -> list[str]:
    """The argv that runs `command` in a private mount namespace where each absolute path in `files`
    is covered: by the given file or directory (bind-mounted; the kind must match), or, for None,
    by an empty read-only file or an empty read-only tmpfs. A None for a path the machine does not
    have is nothing to do; a file given for such a path is a ValueError (tests never create paths
    in the machine's /etc). Parents are mounted before their children.

    `user` (a name or uid; root only): the command runs as that user and its groups, dropped to
    after the mounts. Raises `Unavailable` when this machine cannot do what is asked."""
    steps: list[str] = []
    for target in sorted(files, key=lambda p: (len(Path(p).parts), p)):
        if not os.path.isabs(target):
            raise ValueError(f"not an absolute path: {target!r}")
        source = files[target]
        if source is None:
            if os.path.isdir(target):
                steps += ["tmpfs", target]
            elif os.path.exists(target):
                steps += ["hide", target]
            continue
        source = os.path.abspath(source)
        if not os.path.exists(target):
            raise ValueError(f"{target} does not exist on this machine: nothing to bind {source} over")
        if not os.path.exists(source):
            raise ValueError(f"no such file to place over {target}: {source}")
        if os.path.isdir(source) != os.path.isdir(target):
            raise ValueError(f"{source} and {target} are not the same kind (a directory and a file)")
        steps += ["bind", source, target]
    entry = None
    if user is not None:
        try:
            entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"no such user: {user!r}") from None
        if not real_root():
            raise Unavailable(f"running a shell as {user} needs root")
    return _argv(namespace_mode(), command, steps, entry)


def reachable(path: Path, user: pwd.struct_passwd, need: int = os.R_OK) -> str | None:
    """None if `user` can reach `path` (search every parent, `need` on the path itself), else why not.
    From the mode bits, owner and groups (no ACLs); root reaches everything."""
    if user.pw_uid == 0:
        return None
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    path = Path(os.path.abspath(path))
    chain = [(p, os.X_OK) for p in reversed(path.parents)] + [(path, need)]
    for p, want in chain:
        try:
            st = p.stat()
        except OSError as exc:
            return f"{p}: {exc.strerror}"
        shift = 6 if st.st_uid == user.pw_uid else 3 if st.st_gid in groups else 0
        bits = (st.st_mode >> shift) & 0o7
        if bits & want != want:
            return (f"{user.pw_name} cannot {'search' if want == os.X_OK else 'use'} {p} "
                    f"(mode {stat.filemode(st.st_mode)}); build the test's files under a world-traversable "
                    "directory, e.g. tempfile.mkdtemp() chmod 0755")
    return None


def _binary_mentions(shell: str | None, path: str) -> bool:
    """Whether the shell's binary holds `path` (a compiled-in global rc file name)."""
    if shell is None:
        return False
    try:
        return (path.encode() + b"\0") in Path(shell).resolve().read_bytes()
    except OSError:
        return False


def _hooked(path: Path) -> bool:
    return path.is_file() and hook.MARKER in path.read_text(errors="replace")


def bash_files(root: Path | None) -> tuple[dict[str, Path | None], bool]:
    """The covers for bash's global files, and whether they arm the shell with ROOT's hook: when
    ROOT/etc/bash.bashrc holds the hook and this bash reads /etc/bash.bashrc (Debian's), that file is
    what the shell sees there. Every other global file is hidden, and so is /etc/bash.bashrc when
    not armed (the caller then sources ROOT's hook itself, from ~/.bashrc)."""
    files: dict[str, Path | None] = {p: None for p in BASH_GLOBAL_FILES}
    bashrc = root / hook.BASHRC if root is not None else None
    armed = (bashrc is not None and _hooked(bashrc) and os.path.isfile("/etc/bash.bashrc")
             and _binary_mentions(BASH, "/etc/bash.bashrc"))
    if armed:
        files["/etc/bash.bashrc"] = bashrc
    return files, armed


def zsh_files(root: Path | None) -> tuple[dict[str, Path | None], bool]:
    """The covers for zsh's global files, and whether they arm the shell with ROOT's hook. /etc/zsh
    becomes ROOT/etc/zsh (so /etc/zsh/zshenv and the rest are whatever ROOT holds: usually nothing),
    or an empty tmpfs; each of /etc/zshenv, /etc/zshrc ... becomes ROOT's own or an empty file."""
    files: dict[str, Path | None] = {p: None for p in ZSH_GLOBAL_FILES}
    if root is None:
        return files, False
    if (root / "etc" / "zsh").is_dir() and os.path.isdir("/etc/zsh"):
        files["/etc/zsh"] = root / "etc" / "zsh"
    for name in ZSH_GLOBAL_FILES[1:]:
        if (root / name.lstrip("/")).is_file() and os.path.isfile(name):
            files[name] = root / name.lstrip("/")
    # armed when the zshrc this zsh reads (compiled in: Debian's /etc/zsh/zshrc, or /etc/zshrc) is ROOT's hooked one
    armed = ((files["/etc/zsh"] is not None and _hooked(root / hook.ZSHRC) and _binary_mentions(ZSH, "/etc/zsh/zshrc"))
             or (files["/etc/zshrc"] is not None and _hooked(root / hook.ZSHRC_OTHER)
                 and _binary_mentions(ZSH, "/etc/zshrc")))
    return files, armed


HOME_FILES = (".bashrc", ".bash_profile", ".bash_login", ".profile", ".bash_logout", ".inputrc", ".zshenv",
              ".zprofile", ".zshrc", ".zlogin", ".zlogout", ".ssh/rc")


def login_files(home: Path) -> dict[str, Path | None]:
    """Covers (all hidden) for a daemon whose sessions start a shell, such as an sshd: `ssh host CMD`
    runs `$SHELL -c CMD`, and Debian's bash reads /etc/bash.bashrc and ~/.bashrc even then (it was
    built to, for shells started by sshd); zsh reads its zshenv files; sshd runs /etc/ssh/sshrc or
    ~/.ssh/rc. So: every global rc file of bash and zsh, sshrc, and the dotfiles in the user's `home`."""
    files = {**bash_files(None)[0], **zsh_files(None)[0], "/etc/ssh/sshrc": None}
    files.update({str(home / name): None for name in HOME_FILES})
    return files


def _owner_of(user: str | int | None) -> pwd.struct_passwd | None:
    if user is None:
        return None
    try:
        return pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"no such user: {user!r}") from None


def _spawn(command: list[str], files: Mapping[str, Path | None], home: Path, env: dict[str, str],
           user: str | int | None, root: Path | None, rcs: list[Path]) -> pexpect.spawn:
    import pytest

    entry = _owner_of(user)
    if entry is not None:  # fail here, saying why, rather than with a shell that silently reads nothing
        os.chown(home, entry.pw_uid, entry.pw_gid)
        # the files placed over /etc are read through /etc (their own mode is what counts); the hook
        # body and the spool are reached by their paths under ROOT
        wanted = [(home, os.R_OK | os.W_OK | os.X_OK), *((rc, os.R_OK) for rc in rcs)]
        if root is not None:
            spool = root / hook.DEFAULT_SPOOL_DIR.lstrip("/")
            wanted += [(p, os.R_OK) for p in (root / hook.HOOK_BODY, root / hook.ZSH_BODY) if p.exists()]
            wanted += [(spool, os.W_OK | os.X_OK)] if spool.exists() else []
        for path, need in wanted:
            if (why := reachable(path, entry, need)) is not None:
                raise ValueError(why)
    try:
        argv = isolated_argv(command, files, user=user)
    except Unavailable as exc:
        pytest.skip(str(exc))
    return pexpect.spawn(argv[0], argv[1:], env=env, encoding="utf-8", timeout=20, cwd=str(home))


class _Pty:
    """An interactive shell in a pty that prints `prompt` when it waits for a line."""

    prompt = ""
    child: pexpect.spawn

    def _start(self, command: list[str], files: Mapping[str, Path | None], home: Path, env: dict[str, str],
               user: str | int | None, root: Path | None, rc: Path) -> None:
        self.child = _spawn(command, files, home, env, user, root, [rc])
        try:
            self.child.expect_exact(self.prompt)
        except pexpect.EOF:  # say how it ended (the isolating wrapper's status), not just "EOF"
            self.child.close()
            raise AssertionError(f"{command[0]} ended before its first prompt: exit {self.child.exitstatus}, "
                                 f"signal {self.child.signalstatus}; it printed {self.child.before!r}") from None
        self.startup = str(self.child.before)

    def run(self, line: str) -> str:
        self.child.sendline(line)
        self.child.expect_exact(self.prompt)
        return str(self.child.before)

    def close(self) -> None:
        self.child.sendline("exit")
        self.child.expect(pexpect.EOF)


class Shell(_Pty):
    """An interactive bash in a pty, armed the way an installed server arms it: in its private mount
    namespace /etc/bash.bashrc is ROOT/etc/bash.bashrc (the installed hook) and every other global
    file is hidden (`bash_files`). Where this bash does not read /etc/bash.bashrc, HOME/.bashrc sources
    ROOT's instead. `root=None`: no hook at all. `rc`: more lines for ~/.bashrc; `theme`: a prompt
    theme that appends itself to PROMPT_COMMAND, as themes and direnv do. `user` (root only): the
    shell runs as that user (see the module's docstring for the directories it must reach).
    `startup` is what the shell printed before its first prompt."""

    prompt = PROMPT

    def __init__(self, root: Path | None, home: Path, theme: bool = False, *, rc: Sequence[str] = (),
                 user: str | int | None = None, env: Mapping[str, str] | None = None,
                 argv: Sequence[str] = ("-i",)) -> None:
        if BASH is None:
            raise Unavailable("bash is not installed")
        home.mkdir(parents=True, exist_ok=True)
        self.files, self.armed = bash_files(root)
        lines = [] if self.armed or root is None else [f". {root / hook.BASHRC}"]
        lines.append(f"PS1='{PROMPT}'")
        if theme:
            lines += ["__theme() { THEME_RUNS=$((THEME_RUNS+1)); }",
                      'PROMPT_COMMAND="${PROMPT_COMMAND:+$PROMPT_COMMAND; }__theme"']
        lines += rc
        (home / ".bashrc").write_text("\n".join(lines) + "\n")
        full_env = {"HOME": str(home), "PATH": os.environ["PATH"], "TERM": "dumb", "HISTFILE": str(home / ".hist"),
                    "LOGNAME": "tester", "SSH_CLIENT": "192.0.2.7 50000 22", **(env or {})}
        self._start([BASH, *argv], self.files, home, full_env, user, root, home / ".bashrc")


class Zsh(_Pty):
    """An interactive zsh in a pty, armed as an installed server arms it: in its private mount
    namespace /etc/zsh is ROOT/etc/zsh (its zshrc sources the hook; no zshenv unless ROOT has one) and
    the other distributions' /etc/z* files are ROOT's or empty (`zsh_files`). Where this zsh reads no
    global zshrc it could be given, ~/.zshrc (ZDOTDIR=home) sources ROOT's. `rc`: more lines for
    ~/.zshrc; `user`, `env`, `startup`: as for `Shell`."""

    prompt = ZPROMPT

    def __init__(self, root: Path | None, home: Path, rc: list[str] | None = None, *,
                 user: str | int | None = None, env: Mapping[str, str] | None = None,
                 argv: Sequence[str] = ("-i",)) -> None:
        if ZSH is None:
            raise Unavailable("zsh is not installed")
        home.mkdir(parents=True, exist_ok=True)
        self.files, self.armed = zsh_files(root)
        lines = []
        if not self.armed and root is not None:
            zshrc = next((p for p in (root / hook.ZSHRC, root / hook.ZSHRC_OTHER) if _hooked(p)), root / hook.ZSHRC)
            lines.append(f". {zshrc}")
        lines += [f"PROMPT='{ZPROMPT}'", "unsetopt PROMPT_SP", *(rc or [])]
        (home / ".zshrc").write_text("\n".join(lines) + "\n")
        full_env = {"HOME": str(home), "ZDOTDIR": str(home), "PATH": os.environ["PATH"], "TERM": "dumb",
                    "HISTFILE": str(home / ".hist"), "LOGNAME": "tester", "SSH_CLIENT": "192.0.2.7 50000 22",
                    **(env or {})}
        self._start([ZSH, *argv], self.files, home, full_env, user, root, home / ".zshrc")
