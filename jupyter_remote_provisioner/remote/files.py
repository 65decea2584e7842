"""Files on either end of a sync: which to skip, how to list a tree, how to write one file.

Imported by the local side (``jupyter_remote_provisioner.remote.files``) and by the remote
sync helper (sync.py), so both ends apply the same rules. A file is written under a temporary
name in its destination directory and renamed into place only when complete, so a failed or
interrupted transfer never leaves a half-written file under the real name.
"""

import contextlib
import fnmatch
import hashlib
import os
import stat
import tempfile

# Skipped unless --no-default-excludes: version control, caches, notebook checkpoints...
DEFAULT_EXCLUDES = (".git", ".hg", ".svn", "__pycache__", ".ipynb_checkpoints")
# ...and virtual environments, recognised by what every venv / conda env contains.
VENV_MARKERS = ("pyvenv.cfg", "conda-meta")
TEMP_PREFIX = ".jrp-"
TEMP_SUFFIX = ".part"
CHUNK = 1 << 20

# An entry of a listing: [relative path ("" for the root, "/"-separated), kind, size,
# mtime in ns, permission bits]; kind "d" (directory) or "f" (regular file).
REL, KIND, SIZE, MTIME, MODE = range(5)


class Rules:
    """Exclusions, like rsync's: a pattern without "/" matches a name at any depth, one with
    "/" matches the end of the relative path ("/" first: from the root only), one ending in
    "/" matches directories only. The root itself is never excluded."""

    def __init__(self, patterns=(), defaults=True):
        self.patterns = list(patterns) + (list(DEFAULT_EXCLUDES) if defaults else [])
        self.skip_venvs = defaults

    def excluded(self, rel, path, is_dir):
        name = rel.rsplit("/", 1)[-1]
        for pattern in self.patterns:
            if pattern.endswith("/"):
                if not is_dir:
                    continue
                pattern = pattern.rstrip("/")
            if pattern.startswith("/"):
                if fnmatch.fnmatchcase(rel, pattern[1:]):
                    return True
            elif "/" in pattern:
                if fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(rel, "*/" + pattern):
                    return True
            elif fnmatch.fnmatchcase(name, pattern):
                return True
        return (
            is_dir
            and self.skip_venvs
            and any(os.path.lexists(os.path.join(path, m)) for m in VENV_MARKERS)
        )


def entry(rel, st):
    kind = "d" if stat.S_ISDIR(st.st_mode) else "f"
    return [rel, kind, st.st_size if kind == "f" else 0, st.st_mtime_ns, stat.S_IMODE(st.st_mode)]


def kind_of(path):
    """ "dir", "file", "missing" or "other" (a special file), following symlinks."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    return "file" if stat.S_ISREG(st.st_mode) else "other"


def scan(root, rules, recursive=True):
    """List root (and, for a directory, everything under it that rules keep) as entries,
    directories before their contents, following symlinks; returns (entries, skipped) where
    skipped names broken symlinks, special files and directory loops. Raises OSError."""
    st = os.stat(root)
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return [], [""]
    entries, skipped = [entry("", st)], []
    if recursive and stat.S_ISDIR(st.st_mode):
        _walk(root, "", rules, {(st.st_dev, st.st_ino)}, entries, skipped)
    return entries, skipped


def _walk(path, rel, rules, ancestors, entries, skipped):
    with os.scandir(path) as it:
        items = sorted(it, key=lambda item: item.name)
    for item in items:
        child = rel + "/" + item.name if rel else item.name
        try:
            st = item.stat()
        except FileNotFoundError:  # a broken symlink, or removed meanwhile
            skipped.append(child)
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if rules.excluded(child, item.path, is_dir):
            continue
        if is_dir:
            key = (st.st_dev, st.st_ino)
            if key in ancestors:  # a symlink back up the tree
                skipped.append(child)
                continue
            entries.append(entry(child, st))
            _walk(item.path, child, rules, ancestors | {key}, entries, skipped)
        elif stat.S_ISREG(st.st_mode):
            entries.append(entry(child, st))
        else:
            skipped.append(child)


def file_hash(path):
    """SHA-256 of a file's content, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def join(root, rel):
    return os.path.join(root, *rel.split("/")) if rel else root


def make_dir(path, mode):
    """Create a directory (and missing parents) with the source's permissions plus u+rwx, so
    the sync can fill it; an existing directory is left as it is."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        make_dir(parent, 0o755)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    os.chmod(path, (mode & 0o7777) | 0o700)


class Incoming:
    """One file being received: written under a temporary name in the destination directory,
    renamed over the destination only by commit(); abort() removes the temporary file."""

    def __init__(self, dest, mode, mtime_ns):
        directory, name = os.path.split(dest)
        directory, prefix = directory or ".", TEMP_PREFIX + name[:100] + "."
        try:
            fd, self.temp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=directory)
        except FileNotFoundError:  # the destination's directory does not exist yet
            make_dir(directory, 0o755)
            fd, self.temp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=directory)
        self.file = os.fdopen(fd, "wb")
        self.dest, self.mode, self.mtime_ns = dest, mode, mtime_ns

    def write(self, data):
        self.file.write(data)

    def commit(self):
        self.file.close()  # a late ENOSPC (buffered data) surfaces here
        os.chmod(self.temp, self.mode & 0o7777)
        os.utime(self.temp, ns=(self.mtime_ns, self.mtime_ns))
        os.replace(self.temp, self.dest)

    def abort(self):
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.temp)
