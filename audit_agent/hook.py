"""The bash and zsh hooks that record each command line into its user's spool, and their installer.

Per prompt the hook runs builtins only (no process is started): it reads the last history entry
through a private scratch file (`history 1 > f; read < f`), escapes it and appends one line to the
user's spool with `printf >>`, which opens with O_APPEND and never waits on the agent. A DEBUG trap,
armed from PS0 once per command line, also notes the simple commands that ran, so a command that
never reached the history (`set +o history`, a leading space under HISTCONTROL=ignorespace,
ignoredups) is still recorded, from what bash was about to run. See docs/audit.md for what a shell
hook cannot see. The zsh hook writes the same records from preexec/precmd (add-zsh-hook's arrays),
also with builtins only.

Spool layout: SPOOL_DIR is root's, mode 1733 (anyone may create an entry, nobody may list or
remove another's); each user's shell makes SPOOL_DIR/UID (0700, its own) on first use and writes
SPOOL_DIR/UID/spool. The agent trusts the owner of that directory and file, never the text.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
from pathlib import Path

DEFAULT_SPOOL_DIR = "/var/spool/ombot-audit"
PROFILE_LOADER = "etc/profile.d/ombot-audit.sh"  # login shells (through /etc/profile), POSIX sh syntax
HOOK_BODY = "etc/profile.d/ombot-audit.bash"  # the bash code itself (not *.sh: sh never parses it)
BASHRC = "etc/bash.bashrc"  # interactive non-login shells
ZSH_BODY = "etc/zsh/ombot-audit.zsh"  # the zsh code, sourced from the global zshrc
ZSHRC = "etc/zsh/zshrc"  # every interactive zsh, login or not (Debian's path; zsh -f skips it)
ZSHRC_OTHER = "etc/zshrc"  # where other distributions keep it, used when there is no etc/zsh
ZSHRC_D = "etc/zsh/zshrc.d"  # used instead when the zshrc sources such a directory
ZSHRC_D_BODY = f"{ZSHRC_D}/ombot-audit.zsh"
INSTALLED = "var/lib/ombot-audit/installed.json"  # what install made (in the agent's state directory)
MARKER = "# ombot-audit hook"
RECORD_VERSION = "om1"
MAX_COMMAND_CHARS = 16384  # the hook cuts longer command lines; the agent marks them truncated

# @SPOOL_DIR@ is replaced by a shell-quoted path. Everything the hook defines starts __ombot_audit.
_HOOK = r'''# OMBot shell audit hook, written by `ombot audit-agent install` (docs/audit.md). Do not edit.
if [ -n "${BASH_VERSION-}" ] && (( BASH_VERSINFO[0] >= 5 )) && [[ $- == *i* ]] \
        && [[ -z ${__ombot_audit_dir+set} || ${__ombot_audit_dir@a} != *r* ]]; then
unset __ombot_audit_dir 2>/dev/null  # a value from the environment: ours replaces it
readonly __ombot_audit_dir=@SPOOL_DIR@
__ombot_audit_ready= __ombot_audit_last= __ombot_audit_armed= __ombot_audit_out= __ombot_audit_cwd=
__ombot_audit_ran=() __ombot_audit_void=()
__ombot_audit_loginuid=
{ read -r __ombot_audit_loginuid < /proc/self/loginuid; } 2>/dev/null
__ombot_audit_tty=${SSH_TTY-}
[[ -n $__ombot_audit_tty ]] || __ombot_audit_tty=$(tty 2>/dev/null) || __ombot_audit_tty=  # once per shell

__ombot_audit_prepare() {  # the user's own 0700 directory; mkdir runs only the first time ever
    local d=$__ombot_audit_dir/$EUID
    [[ -e $d || -L $d ]] || command mkdir -m 700 -- "$d" 2>/dev/null
    [[ -d $d && ! -L $d && -O $d ]] || return 1  # taken by someone else: record nothing, the agent reports it
    __ombot_audit_spool=$d/spool __ombot_audit_scratch=$d/.scratch.$$ __ombot_audit_ready=1
}

__ombot_audit_esc() {  # backslash, newline, tab and CR escaped: one record is one line
    __ombot_audit_out=${1//\\/\\\\}
    __ombot_audit_out=${__ombot_audit_out//$'\n'/\\n}
    __ombot_audit_out=${__ombot_audit_out//$'\t'/\\t}
    __ombot_audit_out=${__ombot_audit_out//$'\r'/\\r}
}

__ombot_audit_emit() {  # $1 history number, $2 exit status, $3 how it was seen, $4 command text
    local f=() v
    for v in "${SUDO_USER-}" "${LOGNAME:-${USER-}}" "$__ombot_audit_tty" "${SSH_CLIENT:+${SSH_CLIENT%% *}}" "${__ombot_audit_cwd:-$PWD}" "${4:0:@MAX@}"; do
        __ombot_audit_esc "$v"
        f+=("$__ombot_audit_out")
    done
    printf '@VERSION@\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "${EPOCHREALTIME-}" "$$" "$1" "$2" "$3" \
        "$__ombot_audit_loginuid" "${f[@]}" "${#4}" >> "$__ombot_audit_spool" 2>/dev/null
}

__ombot_audit_entry() {  # history entry $1 ("" = the last) into __ombot_audit_n / __ombot_audit_text
    local e=
    if [[ -z $1 ]]; then HISTTIMEFORMAT= builtin history 1; else HISTTIMEFORMAT= builtin fc -l "$1" "$1"; fi \
        > "$__ombot_audit_scratch" 2>/dev/null
    IFS= read -r -d '' e < "$__ombot_audit_scratch"
    __ombot_audit_n= __ombot_audit_text=
    if [[ $e =~ ^[[:space:]]*([0-9]+)\*?[[:space:]](.*)$ ]]; then
        __ombot_audit_n=${BASH_REMATCH[1]} __ombot_audit_text=${BASH_REMATCH[2]}
        __ombot_audit_text=${__ombot_audit_text#"${__ombot_audit_text%%[![:space:]]*}"}
        __ombot_audit_text=${__ombot_audit_text%$'\n'}
    fi
}

__ombot_audit_prompt() {
    local rc=$? n k ran=("${__ombot_audit_ran[@]}")
    __ombot_audit_armed= __ombot_audit_ran=()
    if [[ -z $__ombot_audit_ready ]] && ! __ombot_audit_prepare; then  # the directory is not ours (yet)
        [[ -n $__ombot_audit_last ]] || __ombot_audit_last=$(( HISTCMD > 1 ? HISTCMD - 1 : 0 ))  # then: "missed"
        return $rc
    fi
    [[ ${PS0-} == *__ombot_audit_armed=1* ]] || PS0='${__ombot_audit_void[__ombot_audit_armed=1]}'"${PS0-}"
    __ombot_audit_entry ""
    n=$__ombot_audit_n
    if [[ -z $__ombot_audit_last ]]; then  # the first prompt: history holds earlier sessions, not this one
        __ombot_audit_last=${n:-0}
    elif [[ -n $n && $n != "$__ombot_audit_last" ]]; then
        if (( n > __ombot_audit_last + 1 && n - __ombot_audit_last <= 64 )); then  # lines the hook missed
            for (( k = __ombot_audit_last + 1; k < n; k++ )); do
                __ombot_audit_entry "$k"
                [[ -z $__ombot_audit_n ]] || __ombot_audit_emit "$k" "" missed "$__ombot_audit_text"
            done
            __ombot_audit_entry ""
        fi
        __ombot_audit_emit "$n" "$rc" history "$__ombot_audit_text"
        __ombot_audit_last=$n
    elif (( ${#ran[@]} )); then  # it ran but history has not got it
        local IFS=$'\n'
        __ombot_audit_emit "$n" "$rc" debug "${ran[*]}"
    fi
    __ombot_audit_cwd=
    return $rc
}

__ombot_audit_saw() {  # the DEBUG trap, while a command line runs
    if [[ $BASH_COMMAND == __ombot_audit_prompt* ]]; then __ombot_audit_armed=; return; fi
    (( ${#__ombot_audit_ran[@]} )) || __ombot_audit_cwd=$PWD  # where the line started
    __ombot_audit_ran+=("$BASH_COMMAND")
    # exec replaces the shell before the next prompt: record it now
    [[ $BASH_COMMAND != "exec "* ]] || __ombot_audit_emit "" "" exec "$BASH_COMMAND"
    (( ${#__ombot_audit_ran[@]} < 8 )) || __ombot_audit_armed=
    [[ ${PROMPT_COMMAND[*]-} == *__ombot_audit_prompt* ]] || __ombot_audit_arm
}

__ombot_audit_arm() {  # first in PROMPT_COMMAND, string or array, keeping what others put there
    if [[ -n ${PROMPT_COMMAND+set} && ${PROMPT_COMMAND@a} == *a* ]]; then
        PROMPT_COMMAND=(__ombot_audit_prompt "${PROMPT_COMMAND[@]}")
    else
        PROMPT_COMMAND="__ombot_audit_prompt${PROMPT_COMMAND:+; ${PROMPT_COMMAND}}"
    fi
}

readonly -f __ombot_audit_prepare __ombot_audit_esc __ombot_audit_emit __ombot_audit_entry \
    __ombot_audit_prompt __ombot_audit_saw __ombot_audit_arm
__ombot_audit_arm
PS0='${__ombot_audit_void[__ombot_audit_armed=1]}'"${PS0-}"
trap '[[ -z $__ombot_audit_armed ]] || __ombot_audit_saw' DEBUG
fi
'''

# The same record as the bash hook's, from zsh's hooks: preexec ($1 is the line as typed, even one
# history drops) notes the line, precmd writes it with its exit status; zshexit writes a line that
# ended the shell. Each hook puts the other back if it was removed from its array.
_ZSH_HOOK = r'''# OMBot shell audit hook (zsh), written by `ombot audit-agent install` (docs/audit.md). Do not edit.
if [[ -n ${ZSH_VERSION-} && -o interactive && ${(t)__ombot_audit_dir-} != *readonly* ]]; then
unset __ombot_audit_dir 2>/dev/null  # a value from the environment: ours replaces it
typeset -gr __ombot_audit_dir=@SPOOL_DIR@
zmodload zsh/datetime 2>/dev/null  # EPOCHREALTIME (a module of builtins: nothing forks per prompt)
typeset -g __ombot_audit_ready= __ombot_audit_line= __ombot_audit_hist= __ombot_audit_cwd= __ombot_audit_out=
typeset -g __ombot_audit_pending= __ombot_audit_spool= __ombot_audit_loginuid= __ombot_audit_tty=${SSH_TTY:-${TTY-}}
typeset -ga __ombot_audit_backlog  # (history number, directory, line) triples
{ read -r __ombot_audit_loginuid < /proc/self/loginuid; } 2>/dev/null

__ombot_audit_prepare() {  # the user's own 0700 directory; mkdir runs only the first time ever
    emulate -L zsh
    local d=$__ombot_audit_dir/$EUID
    [[ -e $d || -L $d ]] || command mkdir -m 700 -- "$d" 2>/dev/null
    [[ -d $d && ! -L $d && -O $d ]] || return 1  # taken by someone else: record nothing, the agent reports it
    __ombot_audit_spool=$d/spool __ombot_audit_ready=1
}

__ombot_audit_esc() {  # backslash, newline, tab and CR escaped: one record is one line
    emulate -L zsh
    __ombot_audit_out=${1//\\/\\\\}
    __ombot_audit_out=${__ombot_audit_out//$'\n'/\\n}
    __ombot_audit_out=${__ombot_audit_out//$'\t'/\\t}
    __ombot_audit_out=${__ombot_audit_out//$'\r'/\\r}
}

__ombot_audit_emit() {  # $1 history number, $2 exit status, $3 how it was seen, $4 command text
    emulate -L zsh
    local -a f
    local v
    for v in "${SUDO_USER-}" "${LOGNAME:-${USER-}}" "$__ombot_audit_tty" "${SSH_CLIENT:+${SSH_CLIENT%% *}}" "${__ombot_audit_cwd:-$PWD}" "${4[1,@MAX@]}"; do
        __ombot_audit_esc "$v"
        f+=("$__ombot_audit_out")
    done
    printf '@VERSION@\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "${EPOCHREALTIME-}" "$$" "$1" "$2" "$3" \
        "$__ombot_audit_loginuid" "${f[@]}" "${#4}" >> "$__ombot_audit_spool" 2>/dev/null
}

__ombot_audit_preexec() {  # a line is about to run: note it (its text, history number, directory)
    emulate -L zsh
    if [[ -z $__ombot_audit_ready ]] && ! __ombot_audit_prepare; then  # the directory is not ours (yet)
        (( ${#__ombot_audit_backlog} >= 192 )) || __ombot_audit_backlog+=("$HISTCMD" "$PWD" "${1:-$3}")
        return 0
    fi
    (( ! ${#__ombot_audit_backlog} )) || __ombot_audit_flush
    if [[ -n $__ombot_audit_pending ]]; then  # the last line was never written: precmd had been removed
        __ombot_audit_emit "$__ombot_audit_hist" "" missed "$__ombot_audit_line"
    fi
    __ombot_audit_line=${1:-$3} __ombot_audit_hist=$HISTCMD __ombot_audit_cwd=$PWD __ombot_audit_pending=1
    (( ${precmd_functions[(Ie)__ombot_audit_precmd]} )) || precmd_functions=(__ombot_audit_precmd $precmd_functions)
    if [[ $__ombot_audit_line == (|*[\;\&\|\(\{[:space:]])exec[[:space:]]* ]]; then  # no prompt follows an exec
        __ombot_audit_emit "$__ombot_audit_hist" "" exec "$__ombot_audit_line"
        __ombot_audit_pending=
    fi
}

__ombot_audit_flush() {  # lines typed while the spool directory was not ours, written once it is
    local i
    for (( i = 1; i < ${#__ombot_audit_backlog}; i += 3 )); do
        __ombot_audit_cwd=${__ombot_audit_backlog[i+1]}
        __ombot_audit_emit "${__ombot_audit_backlog[i]}" "" missed "${__ombot_audit_backlog[i+2]}"
    done
    __ombot_audit_backlog=() __ombot_audit_cwd=
}

__ombot_audit_precmd() {  # the line finished: write it with its exit status
    local rc=$?
    emulate -L zsh
    (( ${preexec_functions[(Ie)__ombot_audit_preexec]} )) || preexec_functions=(__ombot_audit_preexec $preexec_functions)
    if [[ -n $__ombot_audit_pending || ${#__ombot_audit_backlog} -gt 0 ]] \
            && { [[ -n $__ombot_audit_ready ]] || __ombot_audit_prepare; }; then
        (( ! ${#__ombot_audit_backlog} )) || __ombot_audit_flush
        [[ -z $__ombot_audit_pending ]] || __ombot_audit_emit "$__ombot_audit_hist" "$rc" history "$__ombot_audit_line"
    fi
    __ombot_audit_pending= __ombot_audit_cwd=
    return $rc
}

__ombot_audit_exit() {  # the shell ends (exit, logout, end of input): the line that ended it
    local rc=$?
    emulate -L zsh
    if [[ -n $__ombot_audit_pending && -n $__ombot_audit_ready ]]; then
        __ombot_audit_emit "$__ombot_audit_hist" "$rc" history "$__ombot_audit_line"
    fi
    __ombot_audit_pending=
}

typeset -ga precmd_functions preexec_functions zshexit_functions
precmd_functions=(__ombot_audit_precmd ${precmd_functions:#__ombot_audit_precmd})  # first: it sees the line's $?
preexec_functions=(__ombot_audit_preexec ${preexec_functions:#__ombot_audit_preexec})
zshexit_functions=(__ombot_audit_exit ${zshexit_functions:#__ombot_audit_exit})
fi
'''

_LOADER = '''@MARKER@: bash shells load the hook; other shells skip it (docs/audit.md)
if [ -n "${BASH_VERSION-}" ] && [ -r @BODY@ ]; then . @BODY@; fi
'''


def hook_text(spool_dir: str = DEFAULT_SPOOL_DIR, shell: str = "bash") -> str:
    """The hook's code for `shell` (bash or zsh), recording into `spool_dir`."""
    return ((_ZSH_HOOK if shell == "zsh" else _HOOK).replace("@SPOOL_DIR@", shlex.quote(str(spool_dir)))
            .replace("@MAX@", str(MAX_COMMAND_CHARS)).replace("@VERSION@", RECORD_VERSION))


def install(root: Path, spool_dir: str = DEFAULT_SPOOL_DIR) -> list[Path]:
    """Write the hook under `root` (/ on a server, a temporary directory in tests); returns what changed.

    The hook goes to /etc/profile.d (login shells), and one marked line in /etc/bash.bashrc sources
    it in interactive non-login shells. Where zsh is installed, its hook goes to /etc/zsh (sourced by
    one marked line in /etc/zsh/zshrc, or placed in /etc/zsh/zshrc.d when the zshrc sources that).
    Running it again rewrites the hooks and adds no second line. `root` prefixes every path, the
    spool directory's too (made here: the installer's, mode 1733, with root's own directory in it).
    What it created (files, directories), and the files whose last line it ended with a newline, are
    kept in ROOT/INSTALLED, so that `uninstall_hook` and `remove_created` undo exactly this."""
    spool, body = root / spool_dir.lstrip("/"), shlex.quote(str(root / HOOK_BODY))
    watched = _watched(spool_dir)
    existed = {rel for rel in watched if os.path.lexists(root / rel)}
    ended: list[str] = []
    changed = [_write(root / HOOK_BODY, hook_text(str(spool))),
               _write(root / PROFILE_LOADER, _LOADER.replace("@MARKER@", MARKER).replace("@BODY@", body))]
    changed += _source_once(root, BASHRC, body, ended)
    if (root / ZSHRC).parent.is_dir() or (root / ZSHRC_OTHER).exists() or shutil.which("zsh") is not None:
        changed += _install_zsh(root, str(spool), ended)
    spool.mkdir(parents=True, exist_ok=True)
    os.chmod(spool, 0o1733)  # create-only for users, sticky: nobody lists or removes another's entries
    if os.geteuid() == 0 and not os.path.lexists(spool / "0"):
        os.mkdir(spool / "0", 0o700)  # root's own, made now: no user can take it before root's first shell
    _remember(root, [rel for rel in watched if rel not in existed], ended)
    return changed + [spool]


def _install_zsh(root: Path, spool: str, ended: list[str]) -> list[Path]:
    zshrc, rc_dir = ZSHRC, root / ZSHRC_D
    if not (root / zshrc).parent.is_dir() and (root / ZSHRC_OTHER).exists():
        zshrc = ZSHRC_OTHER  # the distribution keeps it there (Fedora, RHEL, Arch)
    if rc_dir.is_dir() and "zshrc.d" in ((root / zshrc).read_text(errors="replace") if (root / zshrc).exists() else ""):
        return [_write(root / ZSHRC_D_BODY, hook_text(spool, "zsh"))]
    body = root / ZSH_BODY
    return [_write(body, hook_text(spool, "zsh")), *_source_once(root, zshrc, shlex.quote(str(body)), ended)]


def _source_once(root: Path, rel: str, body: str, ended: list[str]) -> list[Path]:
    """One marked line in ROOT/REL that sources `body` (quoted); none added if the marker is there. A
    last line without a newline gets one first, and REL goes to `ended` (uninstall takes it off again)."""
    rc = root / rel
    text = rc.read_text() if rc.exists() else ""
    if MARKER in text:
        return []
    rc.parent.mkdir(parents=True, exist_ok=True)
    if text and not text.endswith("\n"):
        ended.append(rel)
    with open(rc, "a") as f:
        f.write(("\n" if rel in ended else "") + f'[ -r {body} ] && . {body}  {MARKER}\n')
    return [rc]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.chmod(partial, 0o644)
    partial.replace(path)  # a shell starting now reads the old hook or the new, never half of one
    return path


# -- what install made, and its undoing ---------------------------------------------------------------


def _watched(spool_dir: str) -> list[str]:
    """Every path (relative to the root) that install may create, parents before children."""
    spool = os.path.normpath(spool_dir.lstrip("/"))
    ends = (HOOK_BODY, PROFILE_LOADER, BASHRC, ZSH_BODY, ZSHRC, ZSHRC_OTHER, ZSHRC_D_BODY, spool, INSTALLED)
    found: list[str] = []
    for end in ends:
        parts = Path(end).parts
        for i in range(1, len(parts) + 1):
            rel = str(Path(*parts[:i]))
            if rel not in found and rel not in (".", ".."):
                found.append(rel)
    return found


def installed_record(root: Path) -> dict[str, list[str]]:
    """ROOT/INSTALLED: {"created": paths install made, "ended": files whose last line it ended}, root-
    relative; empty lists for an install from before the record (then files and lines still go, but no
    directory, and no file that held only our line)."""
    try:
        data = json.loads((root / INSTALLED).read_text())
    except (OSError, ValueError):
        return {"created": [], "ended": []}
    if not isinstance(data, dict):
        return {"created": [], "ended": []}
    return {key: [v for v in data.get(key, []) if isinstance(v, str)] if isinstance(data.get(key), list) else []
            for key in ("created", "ended")}


def _remember(root: Path, created: list[str], ended: list[str]) -> None:
    old = installed_record(root)
    keep = [rel for rel in old["created"] if os.path.lexists(root / rel)]  # made by an earlier run
    made = [rel for rel in created if rel not in keep
            and (os.path.lexists(root / rel) or rel == INSTALLED or INSTALLED.startswith(rel + "/"))]
    _write_record(root, {"created": keep + made, "ended": old["ended"] + [r for r in ended if r not in old["ended"]]})


def _write_record(root: Path, record: dict[str, list[str]]) -> None:
    path = root / INSTALLED
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.chmod(partial, 0o600)
    partial.replace(path)


def uninstall_hook(root: Path, record: dict[str, list[str]] | None = None) -> list[str]:
    """Remove the hook files and the one marked line from each rc file, leaving every other byte of it
    as it was: an rc file that install created and that now holds nothing else is removed; a newline
    install added before its line is taken off when its line is still the last. Returns a line per
    path changed."""
    record = installed_record(root) if record is None else record
    done = []
    for rel in (HOOK_BODY, PROFILE_LOADER, ZSH_BODY, ZSHRC_D_BODY):
        for name in (rel, rel + ".partial"):
            if unlink_entry(root / name):
                done.append(f"removed {root / name}")
    for rel in (BASHRC, ZSHRC, ZSHRC_OTHER):
        done += _unsource(root, rel, record)
    return done


def _unsource(root: Path, rel: str, record: dict[str, list[str]]) -> list[str]:
    path = root / rel
    if not path.is_file():
        return []
    real = Path(os.path.realpath(path))  # a symlinked rc file (an admin's choice, in root's /etc) stays one
    data = real.read_bytes()
    lines = data.splitlines(keepends=True)
    ours = [i for i, line in enumerate(lines) if _is_our_line(line)]
    if not ours:
        return []
    last = ours[-1] == len(lines) - 1
    rest = b"".join(line for i, line in enumerate(lines) if i not in ours)
    if rel in record["ended"] and last and rest.endswith(b"\n"):
        rest = rest[:-1]  # the newline install put after a last line that had none
    if not rest and rel in record["created"]:
        unlink_entry(path)
        return [f"removed {path} (install had made it for the hook line alone)"]
    _rewrite(real, rest)
    return [f"removed the hook line from {path}"]


def _is_our_line(line: bytes) -> bool:
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    return text.startswith("[ -r ") and text.endswith(f"  {MARKER}")


def _rewrite(path: Path, data: bytes) -> None:
    """Replace `path`'s content at once (a shell starting now reads the old or the new), keeping its
    mode and owner."""
    st = os.stat(path)
    partial = path.with_name(f".{path.name}.ombot-uninstall")
    if os.path.lexists(partial):
        os.unlink(partial)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)


def remove_created(root: Path, spool_dir: str, record: dict[str, list[str]], purge: bool) -> list[str]:
    """After the rest is gone: the directories install made that are now empty (deepest first), and
    the record. Without `purge` the spool directory stays, and with it the record of which of its
    parents install made (a later `uninstall --purge` removes them)."""
    spool = os.path.normpath(spool_dir.lstrip("/"))
    created = [rel for rel in record["created"] if rel in _watched(spool_dir)]  # never a path from elsewhere

    def holds(rel: str, inner: str) -> bool:
        return rel == inner or inner.startswith(rel + "/")

    spool_kept = [rel for rel in created if not purge and holds(rel, spool) and os.path.lexists(root / rel)]
    done = []
    for rel in sorted(created, key=lambda r: -len(Path(r).parts)):
        if holds(rel, INSTALLED) or rel in spool_kept:
            continue
        if _rmdir(root / rel):
            done.append(f"removed {root / rel}")
    if spool_kept:
        _write_record(root, {"created": [r for r in created if r in spool_kept or holds(r, INSTALLED)], "ended": []})
        return done
    if unlink_entry(root / INSTALLED):
        done.append(f"removed {root / INSTALLED}")
    for rel in sorted(created, key=lambda r: -len(Path(r).parts)):
        if holds(rel, INSTALLED) and rel != INSTALLED and _rmdir(root / rel):
            done.append(f"removed {root / rel}")
    return done


def _rmdir(path: Path) -> bool:
    """Only an empty directory (never a file, a symlink, or one holding anything) is removed."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        os.rmdir(path)
        return True
    except OSError:
        return False


def unlink_entry(path: Path) -> bool:
    """Remove the entry itself (a symlink, never what it points to); False if there was none."""
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.unlink(path.name, dir_fd=dfd)
        return True
    except (FileNotFoundError, IsADirectoryError):
        return False
    finally:
        os.close(dfd)
