"""Shared by relay and daemon: protocol constants, the error type, process and file helpers,
the private base directories and the lock that serialises daemon start and exit."""

import contextlib
import errno
import fcntl
import getpass
import hashlib
import os
import stat
import sys
import time

PROTOCOL = 3  # 3: Curve keys in a launch's connection (a v2 daemon would drop them)
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
FULL = (errno.ENOSPC, errno.EDQUOT)
START_TIMEOUT = 10.0  # seconds for a new daemon to listen, and for a hello to arrive


class AgentError(Exception):
    """A request failed: the message is the reply's one-line error, extra goes into the reply."""

    def __init__(self, message, **extra):
        Exception.__init__(self, message)
        self.extra = extra


def one_line(text):
    return " ".join(str(text).split()) or "unknown error"


def from_home(path):
    """A remote path as the user means it: "~" expanded, relative ones from the home dir
    (where an exec channel starts; the daemon's own cwd is elsewhere)."""
    return os.path.normpath(os.path.join(os.path.expanduser("~"), os.path.expanduser(path)))


def killpg(pgid, signum):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def exited(proc, block=False):
    """Has proc exited (block: wait until it has)? Leaves it unreaped where the OS allows,
    so its pid stays its group's id and a later killpg cannot hit a recycled pid."""
    if proc.returncode is not None:
        return True
    if not hasattr(os, "waitid") or isinstance(proc, Adopted):
        return (proc.wait() if block else proc.poll()) is not None
    try:
        flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
        return os.waitid(os.P_PID, proc.pid, flags) is not None
    except ChildProcessError:
        return True


class Adopted:
    """The process of a kernel that an earlier daemon started: not our child, so it is
    watched by polling, and its exit status is unknown (reported as UNKNOWN_STATUS)."""

    UNKNOWN_STATUS = -1
    POLL = 0.2

    def __init__(self, pid, start):
        self.pid, self.start, self.returncode = pid, start, None

    def poll(self):
        if self.returncode is None and not process_alive(self.pid, self.start):
            self.returncode = self.UNKNOWN_STATUS
        return self.returncode

    def wait(self):
        while self.poll() is None:
            time.sleep(self.POLL)
        return self.returncode


def file_tail(path, lines=20, limit=4000):
    """Last lines of a log file, for error reports."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-limit:]


def log_tail(kdir):
    """Last lines of the kernel's combined stdout/stderr."""
    return file_tail(os.path.join(kdir, "kernel.log"))


def stat_fields(pid):
    """The fields of Linux /proc/<pid>/stat after the command name (state first); None
    where pid is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parent_pid(pid):
    """The parent of pid (Linux /proc), or None."""
    try:
        return int(stat_fields(pid)[1])
    except (TypeError, ValueError, IndexError):
        return None


def process_name(pid):
    """The command name of pid (Linux /proc), or ""."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def ipykernel_version():
    """Installed ipykernel version without importing it (slow); None if it is absent."""
    try:
        from importlib import metadata

        return metadata.version("ipykernel")
    except Exception:  # noqa: BLE001 - no importlib.metadata (< 3.8) or no dist-info
        import importlib.util

        return "unknown" if importlib.util.find_spec("ipykernel") else None


def user_name():
    try:
        return getpass.getuser()
    except (ImportError, KeyError, OSError):  # no passwd entry for our uid
        return str(os.getuid())


def base_root():
    """Where the private dirs go: $TMPDIR if it names an absolute path, else /tmp. One rule,
    never a probe (tempfile.gettempdir() moves elsewhere when /tmp is full, which would give
    a running kernel's host a second daemon that does not know it)."""
    tmpdir = os.environ.get("TMPDIR", "")
    return os.path.normpath(tmpdir) if os.path.isabs(tmpdir) else "/tmp"


def remedy(err):
    """What to do about an OSError err on the base dir or a file in it."""
    fix = "free space on its file system" if err.errno in FULL else "make it writable"
    return f"{fix}, or set TMPDIR to another directory for SSH logins to this host"


def ensure_base_dir(root, suffix=""):
    """Create or validate <root>/jupyter-remote-<uid><suffix>: a private real directory owned
    by us. Kernel dirs go in the base dir; the daemon's socket, lock and log in "-agent"."""
    uid = os.getuid()
    base = os.path.join(root, f"jupyter-remote-{uid}{suffix}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise AgentError(f"cannot create {base}: {e.strerror}; {remedy(e)}") from None
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode):
        raise AgentError(
            f"{base} is not a directory (or is a symlink); remove it if it is yours, or set "
            f"TMPDIR to a private directory for SSH logins"
        )
    if st.st_uid != uid:
        raise AgentError(
            f"{base} belongs to another user (uid {st.st_uid}), who may have created it "
            f"to spy on kernels; have an administrator remove it, or set TMPDIR to a private "
            f"directory for SSH logins"
        )
    if st.st_mode & 0o077:
        raise AgentError(
            f"{base} is open to other users (mode {st.st_mode & 0o777:o}); "
            f"run `chmod 700 {base}` on the host"
        )
    return base


def proc_stat(pid):
    """(state, start time in clock ticks) of pid from Linux /proc, or None."""
    try:
        fields = stat_fields(pid)
        return fields[0], int(fields[19])
    except (TypeError, ValueError, IndexError):
        return None


def process_start(pid):
    """pid's start time (clock ticks since boot), which tells it from a later process that
    got the same pid; None without /proc."""
    st = proc_stat(pid)
    return st[1] if st else None


def process_alive(pid, start):
    """Is the process pid that started at start (None: unknown) still running?"""
    st = proc_stat(pid)
    if st is not None:
        return st[0] not in ("Z", "X") and (start is None or st[1] == start)
    if os.path.isdir("/proc/self"):
        return False  # /proc exists but pid is not in it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_files():
    """(socket, lock, log) names, relative to the "-agent" dir (the cwd of relay and daemon,
    which keeps the socket path short of the AF_UNIX limit)."""
    h = hashlib.sha256(sys.executable.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    name = f"agent-{h}-v{PROTOCOL}"  # a daemon of another protocol version is another daemon
    return name + ".sock", name + ".lock", name + ".log"


@contextlib.contextmanager
def base_lock(path, timeout):
    """Hold an exclusive flock on path. The daemon removes the file while holding it, so a
    waiter checks that it locked the file still at path, and retries otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise AgentError(f"timed out waiting for the lock {path}") from None
                    time.sleep(0.01)
            st, now = os.fstat(fd), None
            with contextlib.suppress(FileNotFoundError):
                now = os.stat(path)
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)  # releases the flock
