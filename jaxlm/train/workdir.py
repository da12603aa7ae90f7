"""Run-directory safety: one experiment per workdir, one training process at a time.

    previous = check(workdir, config_dict, resume=False, overwrite=False)   # reads only
    with WorkdirLock(workdir, warn=warn):        # raises WorkdirBusyError if another run holds it
        archive_previous_run(workdir)            # --overwrite: moved aside, never deleted
        write_config(workdir, config_dict)

A workdir belongs to the experiment in its config.json. The sections that define *what* is
trained (`IDENTITY_SECTIONS`) must match for a launch to resume there; other sections (steps,
logging, mesh shape) may change between launches. A different experiment is refused unless the
user says `resume` (continue from these checkpoints with the new config, e.g. a new data
mixture) or `overwrite` (start afresh; the old run is moved into `<workdir>/overwritten/<time>/`,
since nothing a researcher saved should disappear because of a flag). A directory that is not
empty but holds no config.json is not a run directory, and is refused the same way.

The lock is `<workdir>/train.lock`, held with `flock` for the life of the run and holding the
holder's PID, host and start time. The kernel drops a flock when its process dies however it
dies, so a lock file nobody holds is a stale one from a crashed run: it is taken over with a
warning. Where the file system has no flock, a lock whose PID is gone from this host counts as
stale. In a multi-process run only process 0 locks (the other processes are the same run).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

IDENTITY_SECTIONS = ("model", "data")
CONFIG_FILE = "config.json"
LOCK_FILE = "train.lock"
ARCHIVE_DIR = "overwritten"


class RunDirError(ValueError):
    """The workdir holds a different experiment (or is otherwise unusable)."""


class WorkdirBusyError(RunDirError):
    """Another live process is training in the workdir."""


def first_difference(old: Any, new: Any, prefix: str) -> str | None:
    """Dotted name of the first field (sorted, depth first) whose value differs, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{prefix}.{key}")
            if found:
                return found
        return None
    return None if old == new else prefix


def _entries(workdir: str) -> list[str]:
    return sorted(name for name in os.listdir(workdir) if name != LOCK_FILE)


def read_previous_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}); pass --overwrite "
                          "to start a new run here (the old files are kept)") from None
    except OSError as e:
        raise RunDirError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(previous, dict):
        raise RunDirError(f"{path} holds {type(previous).__name__}, expected a config object; "
                          "pass --overwrite to start a new run here (the old files are kept)")
    return previous


def check(workdir: str, current: dict, *, resume: bool = False,
          overwrite: bool = False) -> dict | None:
    """Reads only. Returns the workdir's previous config (None for a new or overwritten run);
    raises RunDirError when launching here would mix two experiments."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite: expected at most one of them")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunDirError(f"workdir {workdir} exists and is not a directory")
    if not os.path.isdir(workdir):
        if resume:
            raise RunDirError(f"--resume: workdir {workdir} does not exist; expected a run "
                              "to resume")
        return None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise RunDirError(f"workdir {workdir} is not writable")
    if overwrite:
        return None
    entries = _entries(workdir)
    previous = read_previous_config(workdir)
    if previous is None:
        if resume:
            raise RunDirError(f"--resume: workdir {workdir} has no {CONFIG_FILE}; expected a run "
                              "directory")
        if entries:
            raise RunDirError(f"workdir {workdir} is not empty ({entries[0]}, ...) and holds no "
                              f"{CONFIG_FILE}: expected an empty directory or a run directory "
                              "(pass --overwrite to move its contents aside)")
        return None
    if not resume:
        for section in IDENTITY_SECTIONS:
            field = first_difference(previous.get(section), current.get(section), section)
            if field:
                raise RunDirError(f"workdir {workdir} holds a run with a different {section} "
                                  f"config (differs in {field}); use a new --workdir, --resume "
                                  "to continue it with this config, or --overwrite")
    return previous


def write_config(workdir: str, config: dict) -> None:
    """workdir/config.json, replaced atomically."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, path)


def archive_previous_run(workdir: str) -> str | None:
    """Moves everything in `workdir` (but the lock and earlier archives) into
    `<workdir>/overwritten/<UTC time>/`; returns that path, or None if there was nothing."""
    names = [n for n in _entries(workdir) if n != ARCHIVE_DIR]
    if not names:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = os.path.join(workdir, ARCHIVE_DIR, stamp)
    n = 1
    while os.path.exists(target):
        target, n = os.path.join(workdir, ARCHIVE_DIR, f"{stamp}.{n}"), n + 1
    os.makedirs(target)
    for name in names:
        os.rename(os.path.join(workdir, name), os.path.join(target, name))
    return target


# ---- the lock --------------------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused PID apart;
    None where /proc is not available or the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the lock's owner (on this host) is still running."""
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    recorded, now = owner.get("start_time"), _start_time(pid)
    return recorded is None or now is None or recorded == now


def _describe(owner: dict) -> str:
    return (f"process {owner.get('pid', '?')} on {owner.get('host', '?')} "
            f"(since {owner.get('started', '?')})")


class WorkdirLock:
    """`with WorkdirLock(workdir, warn=...)`: exclusive right to train in `workdir`.

    Creates the workdir if needed; on release, removes the lock file and, if this lock created
    the directory and it is still empty, the directory too (a launch that failed early leaves
    no trace)."""

    def __init__(self, workdir: str, warn: Callable[[str], None] = print):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.warn = warn
        self._fd: int | None = None
        self._created_dir = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            if not os.path.isdir(self.workdir):
                os.makedirs(self.workdir)
                self._created_dir = True
            self._acquire()
        except OSError as e:
            self._remove_created_dir()
            raise RunDirError(f"workdir {self.workdir}: cannot take the lock {self.path} "
                              f"({e.strerror})") from None
        except BaseException:
            self._remove_created_dir()
            raise

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            locked = self._flock(fd)
            owner = self._read(fd)
            # Without flock, a lock of another host cannot be checked: it counts as held.
            if locked is False or (locked is None and owner and (
                    owner.get("host") != socket.gethostname() or _alive(owner))):
                os.close(fd)
                raise WorkdirBusyError(
                    f"workdir {self.workdir} is in use by {_describe(owner or {})} (lock "
                    f"{self.path}); wait for that run to end or stop it (a lock left by a "
                    "dead process is taken over by itself)")
            # The file may have been removed (and re-created) by its previous holder between
            # our open and our flock: then we hold a lock on a dead inode; try again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if owner:
            self.warn(f"warning: taking over the stale lock {self.path} of {_describe(owner)}, "
                      "which is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(
            os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: someone holds it; None: this file system has no flock."""
        import fcntl
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            return None

    @staticmethod
    def _read(fd: int) -> dict | None:
        data = os.pread(fd, 65536, 0)
        if not data.strip():
            return None
        try:
            owner = json.loads(data.decode("utf-8", "replace"))
        except json.JSONDecodeError:
            return {"pid": "?", "host": "?", "started": "?"}
        return owner if isinstance(owner, dict) else {}

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the flock
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        if self._created_dir:
            try:
                os.rmdir(self.workdir)  # only if empty
            except OSError:
                pass


@contextmanager
def claimed(workdir: str, warn: Callable[[str], None] = print) -> Iterator[None]:
    """The workdir's lock for the life of the block: process 0 takes it, and in a
    multi-process run every process raises process 0's error if it could not."""
    from jaxlm.parallel import distributed
    lock, error = None, None
    if distributed.is_main_process():
        lock = WorkdirLock(workdir, warn)
        try:
            lock.acquire()
        except RunDirError as e:
            error = e
    if not distributed.is_single_process():
        message = distributed.allgather_json(None if error is None else str(error))[0]
        if message is not None and error is None:
            error = RunDirError(message)
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
