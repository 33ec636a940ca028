"""Small fixed Python programs the Ansible backend runs on hosts, as `python3 -c SNIPPET ARG...`.

Every value reaches them as an argv item, never as text inside the program, and the programs are
sent to Ansible marked unsafe (never templated). They need only the standard library of the
Python that Ansible itself uses on the host.
"""

from __future__ import annotations

CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_WITHIN = """
import os, sys
def within(path, root):
    root = os.path.normpath(root)
    return path == root or path.startswith(root.rstrip('/') + '/')
def fail(message, rc=1):
    sys.stderr.write(message + '\\n')
    sys.exit(rc)
def require_within(label, shown, real, roots):
    if not any(within(real, root) for root in roots):
        fail('%s%s resolves to %s, outside %s' % (label, shown, real, ', '.join(roots)))
"""

# argv: LABEL PATH ROOT...
REQUIRE_WITHIN = _WITHIN + """
label, path, roots = sys.argv[1], sys.argv[2], sys.argv[3:]
require_within(label, path, os.path.realpath(path), roots)
"""

# argv: PROGRAM... ; prints the index of the first installed one, or exits 127.
FIRST_INSTALLED = """
import os, shutil, sys
for index, program in enumerate(sys.argv[1:]):
    if os.access(program, os.X_OK) if '/' in program else shutil.which(program, path=%r):
        print(index)
        sys.exit(0)
sys.stderr.write('none of these programs is installed: %%s\\n' %% ', '.join(sys.argv[1:]))
sys.exit(127)
""" % CHILD_PATH

TAIL_TOTAL_MARK = "\nOMBOT-TAIL-BYTES "

# argv: LABEL PATH LINES CAP ROOT... ; tail -n LINES, at most CAP bytes, read from a descriptor that
# was checked after opening (regular file, one link, real path under a root); the full size of what
# tail would print goes to stderr after TAIL_TOTAL_MARK.
TAIL = _WITHIN + """
import stat
label, path, lines, cap, roots = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
require_within(label, path, os.path.realpath(path), roots)
try:
    fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
except OSError as exc:
    fail('%scannot open %s: %s' % (label, path, exc.strerror))
info = os.fstat(fd)
if not stat.S_ISREG(info.st_mode):
    fail('%s%s is not a regular file' % (label, path))
if info.st_nlink != 1:
    fail('%s%s has %d links; only single-link files are shown' % (label, path, info.st_nlink))
require_within(label, path, os.readlink('/proc/self/fd/%d' % fd), roots)
size = info.st_size
end = size - 1 if size and os.pread(fd, 1, size - 1) == b'\\n' else size
start, seen, pos = 0, 0, end
while pos > 0 and not start:
    block_start = max(0, pos - 65536)
    block = os.pread(fd, pos - block_start, block_start)
    index = len(block)
    while True:
        index = block.rfind(b'\\n', 0, index)
        if index < 0:
            break
        seen += 1
        if seen == lines:
            start = block_start + index + 1
            break
    pos = block_start
data = os.pread(fd, min(cap, size - start), start)
sys.stdout.buffer.write(data)
sys.stdout.flush()
sys.stderr.write(MARK + str(size - start))
""".replace("MARK", repr(TAIL_TOTAL_MARK))

# argv: JOB_ID TMP_PREFIX ; ends every process of this user whose environment carries OMBOT_JOB_ID=JOB_ID (what
# a cancelled or overdue job started, even `setsid cmd &`), and removes the job's temporary directories.
STOP_JOB = """
import glob, os, shutil, signal, sys, tempfile, time
job, prefix = sys.argv[1], sys.argv[2]
mark = ('OMBOT_JOB_ID=' + job).encode()
def marked():
    found = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open('/proc/%s/environ' % entry, 'rb') as f:
                if mark in f.read().split(b'\\0'):
                    found.append(int(entry))
        except OSError:
            pass
    return found
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in marked():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    time.sleep(0.5)
for path in glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(prefix) + '*')):
    if os.path.isdir(path) and not os.path.islink(path) and os.lstat(path).st_uid == os.geteuid():
        shutil.rmtree(path, ignore_errors=True)
"""
