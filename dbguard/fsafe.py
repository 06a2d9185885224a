"""Files dbguard writes as root, written so that nobody else can redirect them.

A directory dbguard writes into must be root's (or the running user's) and not writable by
group or others, and so must every symbolic link on the way to it; otherwise another user
could swap a file in it for a link to /etc/shadow. Files are never opened through a link
(O_NOFOLLOW), temporary files are always new (O_EXCL, random names) and a state file is
replaced by rename, which replaces a planted link instead of writing through it.
"""
from __future__ import annotations

import errno
import os
import stat
import time

from .errors import DbguardError
from .escape import printable

# Files dbguard reads back (state files) are small; a huge one is not ours.
READ_LIMIT = 1 << 20


def _owner_ok(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _who(uid: int) -> str:
    import pwd
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def dir_problem(path: str) -> str | None:
    """Why dbguard must not write into directory `path` (None: it may). A missing directory
    is judged by the part of the path that exists: dbguard would create the rest, 0700."""
    parts = os.path.normpath(path).split(os.sep)
    prefixes = ["/"] + ["/".join(parts[:i + 1]) for i in range(1, len(parts)) if parts[i]]
    for i, prefix in enumerate(prefixes):
        leaf = i == len(prefixes) - 1
        try:
            link = os.lstat(prefix)
            st = os.stat(prefix)
        except FileNotFoundError:
            return None             # from here on dbguard creates it
        except OSError as e:
            return f"cannot look at {printable(prefix)}: {e.strerror}"
        if stat.S_ISLNK(link.st_mode) and not _owner_ok(link.st_uid):
            return (f"{printable(prefix)} is a symbolic link owned by {_who(link.st_uid)}: anyone who owns it "
                    f"can point dbguard's writes elsewhere; remove it or use another path")
        if not stat.S_ISDIR(st.st_mode):
            return f"{printable(prefix)} is not a directory"
        if not _owner_ok(st.st_uid):
            return (f"{printable(prefix)} is owned by {_who(st.st_uid)}, not root: "
                    f"chown root {printable(prefix)} or use another path")
        if leaf and st.st_mode & 0o022:
            return (f"{printable(prefix)} can be written by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                    f"chmod go-w {printable(prefix)}")
        if not leaf and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            return (f"{printable(prefix)} can be written by anyone (mode {stat.S_IMODE(st.st_mode):04o}, not "
                    f"sticky): chmod o-w {printable(prefix)} or use another path")
    return None


def ensure_dir(path: str, key: str) -> None:
    """Create `path` (0700) if it is missing, then refuse it in one line naming `key` if it is
    not safe to write into (see dir_problem)."""
    why = dir_problem(path)
    if why is None:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            why = f"cannot create {printable(path)}: {e.strerror}"
        else:
            why = dir_problem(path)     # again: what exists now, made by us or raced in
    if why is not None:
        raise DbguardError(f"{key}: {why}")


def open_append(path: str, key: str, mode: int = 0o640) -> int:
    """A file descriptor appending to `path` (created `mode`), never through a link; a
    regular file of ours, or a character device (/dev/null, /dev/full)."""
    ensure_dir(os.path.dirname(path) or "/", key)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DbguardError(f"{key}: {printable(path)} is a symbolic link; dbguard does not write through "
                               "links as root: point it at the file itself") from None
        raise DbguardError(f"{key}: cannot open {printable(path)} for appending: {e.strerror}; "
                           "create the directory or choose another path") from None
    st = os.fstat(fd)
    why = None
    if stat.S_ISREG(st.st_mode):
        if not _owner_ok(st.st_uid):
            why = f"{printable(path)} is owned by {_who(st.st_uid)}, not root: remove it or chown root"
    elif not stat.S_ISCHR(st.st_mode):
        why = f"{printable(path)} is not a regular file"
    if why is not None:
        os.close(fd)
        raise DbguardError(f"{key}: {why}")
    os.set_blocking(fd, True)       # O_NONBLOCK was only so a planted FIFO cannot hang the open
    return fd


def read_small(path: str | os.PathLike, limit: int = READ_LIMIT) -> bytes:
    """A small regular file's bytes, not through a link. FileNotFoundError when missing;
    another OSError (ELOOP: a link) or ValueError (not a regular file, too big) otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{st.st_size} bytes, larger than a state file gets")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ValueError("grew past the size of a state file while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` all at once (fsync'd): a new 0600 temp file (O_EXCL, random
    name, never a link) renamed over it. A crash leaves the old file or the new one."""
    directory, name = os.path.split(os.fspath(path))
    dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{name}.{os.urandom(8).hex()}.tmp"      # secrets.token_hex, without hashlib
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)


def move_aside(path: str | os.PathLike, tag: str = "damaged") -> str:
    """Rename `path` (a link is renamed itself, never followed) to `path.<tag>-<time>`."""
    base = f"{os.fspath(path)}.{tag}-{time.strftime('%Y%m%dT%H%M%S')}"
    new, n = base, 1
    while os.path.lexists(new):
        n += 1
        new = f"{base}.{n}"
    os.rename(path, new)
    return new


def remove(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
