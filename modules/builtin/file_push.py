from ombot.modules import Plan, PutFile, module, params as p

# Where pushed files may land: application and service trees plus scratch space. Not /etc, /usr or
# home directories: changing those is configuration management's job, with review.
DEST_ROOTS = ("/opt", "/srv", "/tmp", "/var/tmp")
STORE_PATH = r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*"  # relative, no '..' or dot files
ACCOUNT = r"[a-z_][a-z0-9_-]{0,31}"


@module("file.push", category="files", risk="high", params=[
    p.String("source", help="file in the master's store, e.g. app/app.conf", pattern=STORE_PATH, max_len=255),
    p.Path("dest", help="destination path under " + ", ".join(DEST_ROOTS), roots=DEST_ROOTS),
    p.String("mode", help="octal permissions such as 0644 (no set-id or sticky bits)", pattern=r"0?[0-7]{3}",
             required=False, default="0644"),
    p.String("owner", help="user to own the file", pattern=ACCOUNT, required=False),
    p.String("group", help="group to own the file", pattern=ACCOUNT, required=False),
])
def run(source: str, dest: str, mode: str, owner: str | None, group: str | None) -> Plan:
    """Copy a file from the master's file store to a path on each host, with mode and owner."""
    # One step: the check that no symlink leads outside the roots and the write happen together on
    # the host, by descriptors, so nothing can be swapped in between.
    return Plan(PutFile(dest, source=source, mode=int(mode, 8), owner=owner, group=group, roots=DEST_ROOTS,
                        param="dest"))
