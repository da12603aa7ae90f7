"""Run untrusted Python (model-generated code) in a separate, locked-down process.

`run_sandboxed(program, timeout_s, memory_bytes)` never `exec`s the program in the evaluating
process. It starts a small trusted launcher (this module, imported by `python -I -S`),
which isolates itself and then forks the program as `python -I -S program.py` (standard
library only unless site_packages=True):

1. Namespaces (one `unshare(2)` through ctypes; Python 3.11 has no `os.unshare`): a new
   **network** namespace (only a loopback that is down, so every connect fails, 127.0.0.1
   included), a new **mount** namespace and a new **PID** namespace. As root they are created
   directly; otherwise inside a new user namespace when the kernel allows unprivileged ones.
2. Filesystem (needs the mount namespace): every mount is re-mounted read-only, then a private,
   size-capped tmpfs owned by the sandbox uid is mounted on /tmp and becomes the working
   directory, HOME and TMPDIR. It disappears with the namespace. As root, directories the
   sandbox uid may not enter but the interpreter lives under (pyenv in /root) are covered with
   an empty tmpfs into which only the interpreter prefix is bind-mounted, which also hides the
   rest of /root.
3. Privileges: as root the program runs as a fresh, otherwise unused uid/gid (random in a high
   range, no supplementary groups), so RLIMIT_NPROC (ignored for root) really bounds its
   processes, it owns no file on the machine and it cannot signal anything but itself. A
   shared uid such as 65534 would let one sandbox's fork bomb starve a concurrent one.
4. rlimits: CPU seconds, address space, file size, process count, open files, no core dumps.
5. Time and cleanup: a small trusted init (PID 1 of the new PID namespace) forks the program,
   reaps every orphan and reports the program's wait status. At the wall-clock timeout the
   launcher kills the init; when the init exits the kernel kills every process left in the
   namespace, however it daemonised (setsid, double fork). `PR_SET_PDEATHSIG` chains program
   -> init -> launcher. The parent starts the launcher in its own session, waits for it (no
   zombies) and has a backstop that kills that session. Without a PID namespace it afterwards
   kills every process still owned by the sandbox uid.
6. Environment scrubbed to PATH, HOME, TMPDIR, locale and single-threaded BLAS settings;
   stdin is /dev/null; stdout/stderr go to files capped by RLIMIT_FSIZE (Python ignores
   SIGXFSZ, so an over-long write raises OSError and the program fails cleanly) and only their
   tails are returned.

Not provided: confidentiality of world-readable files (the program can read the repository,
though not /root), and CPU or memory fairness beyond the rlimits (no cgroup).

Where a mechanism is unavailable the launcher falls back and says so in
`SandboxResult.isolation` rather than pretending: without namespaces (e.g. a container without
CAP_SYS_ADMIN and with user namespaces disabled) there is no network isolation, writes are
limited only by file permissions, and leftover processes are found by uid (root) or process
group (non-root; a program that calls setsid can then escape). Running as root without a mount
namespace works only if the interpreter is reachable by the sandbox uid; otherwise
`SandboxError` says so. What a sandbox cannot stop: the program forging its own success
(`os._exit(0)` before the asserts run) — true of every HumanEval harness.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

STATUSES = ("passed", "failed", "timeout", "killed")

_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME = 32, 1024, 2048
_MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE, _MS_RELATIME = 4096, 8192, 16384, 1 << 18, 1 << 21
_PR_SET_PDEATHSIG = 1
# statvfs f_flag bit -> mount flag to keep when re-mounting read-only (locked flags must stay)
_KEEP_FLAGS = {1: _MS_RDONLY, 2: _MS_NOSUID, 4: _MS_NODEV, 8: _MS_NOEXEC, 1024: _MS_NOATIME,
               2048: _MS_NODIRATIME, 4096: _MS_RELATIME}
_UID_RANGE = (1_000_000_000, 1_100_000_000)
_BACKSTOP_S = 10.0  # extra wall time the launcher gets (interpreter start, namespace setup)
# The launcher imports this file as a top-level module (standard library only, no site) so that
# its cached bytecode is used; running it as a script would recompile it each time (~60 ms).
_LAUNCH = ("import sys; sys.path.append(sys.argv[1]); import sandbox; "
           "sandbox._launcher_main(sys.argv[2])")


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up; says nothing about the program."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    status: passed (exit 0), failed (non-zero exit, e.g. an exception or MemoryError),
    timeout (killed at the wall-clock limit), killed (died of a signal: CPU rlimit, SIGSEGV...).
    """
    status: str
    exit_code: int | None
    signal: int | None
    stdout: str  # last output_tail_bytes of stdout
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    wall_s: float
    isolation: dict

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _check(name, value, ok, expected):
    if not ok:
        raise ValueError(f"{name}={value!r}: expected {expected}")


def run_sandboxed(program: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30, *,
                  cpu_s: float | None = None, max_processes: int = 16,
                  max_file_bytes: int = 16 << 20, workdir_bytes: int = 64 << 20,
                  output_tail_bytes: int = 8192, uid: int | None = None,
                  site_packages: bool = False, extra_env: dict | None = None) -> SandboxResult:
    """Runs `program` (Python source) under `python -I` in the sandbox described above.

    memory_bytes caps the address space of each process; cpu_s (default timeout_s + 1) the CPU
    seconds of each process; max_processes the processes/threads of the sandbox uid;
    max_file_bytes every file written, stdout and stderr included; workdir_bytes the private
    tmpfs. uid (root only) overrides the fresh random uid. The program sees the standard
    library only unless site_packages=True (site start-up nearly triples the interpreter's
    start here, ~15 -> ~45 ms; HumanEval needs the standard library only). Safe to call from
    several threads.
    """
    _check("program", type(program).__name__, isinstance(program, str), "a str of Python source")
    _check("timeout_s", timeout_s, isinstance(timeout_s, (int, float)) and timeout_s > 0,
           "a positive number of seconds")
    for name, value, minimum, expected in [
            ("memory_bytes", memory_bytes, 64 << 20,
             "an int >= 64 MiB (the interpreter alone maps ~30 MiB)"),
            ("max_processes", max_processes, 1, "an int >= 1"),
            ("max_file_bytes", max_file_bytes, 4096, "an int >= 4096"),
            ("workdir_bytes", workdir_bytes, 1 << 20, "an int >= 1 MiB")]:
        _check(name, value, isinstance(value, int) and value >= minimum, expected)
    cpu_s = float(cpu_s if cpu_s is not None else timeout_s + 1.0)
    _check("cpu_s", cpu_s, cpu_s > 0, "a positive number of seconds")
    is_root = os.geteuid() == 0
    if uid is None and is_root:
        uid = _fresh_uid()
    _check("uid", uid, uid is None or (is_root and isinstance(uid, int) and uid > 0),
           "None, or (when running as root) a positive int other than 0")

    host_dir = tempfile.mkdtemp(prefix="jaxlm-sandbox-")
    read_fd = write_fd = None
    try:
        os.chmod(host_dir, 0o711)  # root-owned; the program never sees it (it gets /tmp)
        with open(os.path.join(host_dir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        read_fd, write_fd = os.pipe()
        config = dict(
            status_fd=write_fd, host_dir=host_dir, python=_program_python(site_packages), uid=uid,
            timeout_s=float(timeout_s), cpu_s=cpu_s, memory_bytes=memory_bytes,
            max_processes=max_processes, max_file_bytes=max_file_bytes,
            workdir_bytes=workdir_bytes, extra_env=dict(extra_env or {}),
            site_packages=bool(site_packages),
            python_prefixes=sorted({os.path.realpath(p) for p in
                                    (sys.prefix, sys.base_prefix, sys.exec_prefix)}))
        out_path, err_path = os.path.join(host_dir, "stdout"), os.path.join(host_dir, "stderr")
        started = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCH, os.path.dirname(os.path.abspath(
                    __file__)), json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(write_fd,),
                start_new_session=True, cwd=host_dir,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        os.close(write_fd)
        write_fd = None
        # The launcher's report pipe reaches EOF when it exits; waiting on the pipe avoids
        # Popen.wait(timeout)'s polling sleeps (up to 50 ms per run).
        raw, complete = _read_until_eof(read_fd, deadline=time.monotonic() + timeout_s
                                        + _BACKSTOP_S)
        backstop = not complete
        if backstop:
            _killpg(proc.pid)
        proc.wait()
        wall = time.monotonic() - started
        report = _parse_report(raw)
        if "pid" not in report.get("isolation", {}).get("namespaces", ()):
            # No PID namespace took the leftovers down with it: sweep by uid, else by the
            # launcher's process group (which a program that called setsid has left).
            if uid is not None:
                kill_processes_of(uid)
            else:
                _killpg(proc.pid)
        out_tail, out_bytes = _tail(out_path, output_tail_bytes)
        err_tail, err_bytes = _tail(err_path, output_tail_bytes)
    finally:
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(host_dir, ignore_errors=True)

    if "error" in report:
        raise SandboxError(f"sandbox setup failed: {report['error']}")
    if backstop or "exit" not in report:
        if not backstop:  # the launcher died without a verdict: a bug, not a program outcome
            raise SandboxError(f"sandbox launcher exited with {proc.returncode} without a "
                               f"report; stderr tail: {err_tail[-500:]!r}")
        return SandboxResult("timeout", None, signal.SIGKILL, out_tail, err_tail, out_bytes,
                             err_bytes, wall, report.get("isolation", {}))
    final = report["exit"]
    if final["timed_out"]:
        status = "timeout"
    elif final["signal"] is not None:
        status = "killed"
    else:
        status = "passed" if final["exit_code"] == 0 else "failed"
    return SandboxResult(status, final["exit_code"], final["signal"], out_tail, err_tail,
                         out_bytes, err_bytes, final["wall_s"], report["isolation"])


def processes_of(uid: int) -> list[int]:
    """Live (non-zombie) process ids whose real uid is `uid`, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # exited while we looked
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def kill_processes_of(uid: int, rounds: int = 50) -> int:
    """SIGKILLs every process of `uid` until none is left (a dying process cannot fork, so
    repeated rounds converge); returns how many were killed. Never used for uid 0."""
    if uid == 0:
        raise ValueError("uid=0: refusing to kill every root process")
    killed = 0
    for _ in range(rounds):
        pids = processes_of(uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    return killed


def _fresh_uid() -> int:
    """A random uid from a high range that the current user namespace maps; 65534 if none."""
    lo, hi = _UID_RANGE
    try:
        with open("/proc/self/uid_map") as f:
            ranges = [tuple(int(v) for v in line.split()) for line in f if line.strip()]
    except OSError:
        ranges = []
    if any(inner <= lo and hi <= inner + count for inner, _, count in ranges):
        return lo + secrets.randbelow(hi - lo)
    return 65534


def _killpg(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_until_eof(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Reads `fd` until EOF or the deadline; returns (data, reached EOF)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        if not poller.poll(left * 1000):
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _parse_report(raw: bytes) -> dict:
    report = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            report.update(json.loads(line))
        except ValueError:
            pass
    return report


def _tail(path: str, n: int) -> tuple[str, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - n))
        return f.read().decode("utf-8", "replace"), size


# --------------------------------------------------------------------------------------------
# The launcher. Everything below runs in the child interpreter (python -I -S, see _LAUNCH), so
# this module uses the standard library only.

def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    return libc


def _mount(libc, source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def _unshare(libc, flags) -> bool:
    return libc.unshare(flags) == 0


def _enter_namespaces(libc, is_root: bool) -> set:
    """Creates net+mount+pid namespaces (via a user namespace when not root); returns which."""
    full = _CLONE_NEWNET | _CLONE_NEWNS | _CLONE_NEWPID
    attempts = [(full, {"net", "mnt", "pid"}), (_CLONE_NEWNET, {"net"})]
    for flags, names in attempts:
        if is_root:
            if _unshare(libc, flags):
                return names
            continue
        uid, gid = os.getuid(), os.getgid()
        if _unshare(libc, flags | _CLONE_NEWUSER):
            # Map our own ids into the namespace (files keep their owners); setgroups must be
            # denied before an unprivileged process may write gid_map.
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"{gid} {gid} 1")
            return names | {"user"}
    return set()


def _blocked_ancestor(path: str) -> str | None:
    """The shallowest directory on `path` that others may not traverse, if any."""
    current = ""
    for part in path.strip("/").split("/"):
        current += "/" + part
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _mountpoints() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            points.append(raw.encode().decode("unicode_escape"))  # \040 (space) etc.
    return points


def _program_python(site_packages: bool) -> str:
    """The interpreter that runs the program. Without site-packages the base interpreter of a
    virtual environment is enough (the standard library lives under its prefix), and it must be
    used when the environment itself is under /tmp, which the sandbox covers with its tmpfs."""
    python = sys.executable
    if not site_packages:
        python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    if any(path.startswith("/tmp/") for path in (os.path.abspath(python), os.path.realpath(python))):
        raise SandboxError(f"interpreter {python} lives under /tmp, which the sandbox replaces "
                           "with its private tmpfs; run from a Python installed elsewhere")
    return python


def _lock_filesystem(libc, config, uid) -> tuple[str, list[str]]:
    """In the new mount namespace: expose the interpreter to `uid`, make every mount read-only,
    and mount a private tmpfs workdir on /tmp. Returns the workdir and the mount points that
    stayed writable (none on a normal kernel)."""
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    if uid is not None:
        blocked = {}
        for prefix in config["python_prefixes"]:
            top = _blocked_ancestor(prefix)
            if top == prefix:
                raise OSError(f"interpreter prefix {prefix} is not traversable by others")
            if top is not None:
                blocked[prefix] = top
        staged = {}
        for i, prefix in enumerate(sorted(blocked)):
            stage = os.path.join(config["host_dir"], f"stage{i}")
            os.mkdir(stage)
            _mount(libc, prefix, stage, None, _MS_BIND | _MS_REC)
            staged[prefix] = stage
        covered = []
        for top in sorted(set(blocked.values()), key=len):
            if not any(top.startswith(c + "/") for c in covered):
                _mount(libc, "tmpfs", top, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
                covered.append(top)
        for prefix, stage in staged.items():
            os.makedirs(prefix, mode=0o755, exist_ok=True)
            _mount(libc, stage, prefix, None, _MS_MOVE)
    for point in _mountpoints():
        try:
            kept = os.statvfs(point).f_flag
            flags = sum(ms for st, ms in _KEEP_FLAGS.items() if kept & st)
            _mount(libc, None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags)
        except OSError:
            pass  # e.g. a shadowed mount point; judged by the check below
    writable = sorted({p for p in _mountpoints() if not os.statvfs(p).f_flag & 1})
    if "/" in writable:
        raise OSError("could not re-mount / read-only")
    owner = uid if uid is not None else os.getuid()
    group = uid if uid is not None else os.getgid()
    _mount(libc, "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={config['workdir_bytes']},mode=0700,uid={owner},gid={group}")
    return "/tmp", writable


def _set_limits(config, uid):
    cpu = max(1, int(-(-config["cpu_s"] // 1)))
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (config["memory_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (config["max_file_bytes"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_NOFILE: (256, 256),
    }
    nproc = config["max_processes"]
    if uid is None:  # the count is shared with everything else this user runs
        nproc += len(processes_of(os.getuid()))
    limits[resource.RLIMIT_NPROC] = (nproc, nproc)
    for which, value in limits.items():
        resource.setrlimit(which, value)


def _prepare_workdir(libc, namespaces, workdir, uid, source: bytes):
    """In the init process: a /proc for the PID namespace and the program file."""
    if "pid" in namespaces and "mnt" in namespaces:
        # The program sees only its own processes. Some kernels refuse this inside a user
        # namespace; the host /proc then stays (read-only).
        try:
            _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY)
        except OSError:
            pass
    program_path = os.path.join(workdir, "program.py")
    with open(program_path, "wb") as f:
        f.write(source)
    os.chmod(program_path, 0o444)
    if workdir != "/tmp":  # no mount namespace: a directory of the host filesystem
        os.chmod(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)


def _exec_program(libc, config, workdir, uid):
    """Runs in the program's process: limits, privilege drop, exec. Never returns."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update({str(k): str(v) for k, v in config["extra_env"].items()})
    _set_limits(config, uid)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid or os.getgroups():
            raise OSError(f"privilege drop to uid {uid} did not take effect")
    # Die with the init process (set after setuid, which clears it).
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.chdir(workdir)
    os.umask(0o077)
    python = config["python"]
    flags = ["-I"] if config["site_packages"] else ["-I", "-S"]
    os.execve(python, [python, *flags, "program.py"], env)


def _init_main(libc, config, namespaces, workdir, uid, source, err_pipe, result_write):
    """The sandbox's init (PID 1 of the PID namespace when there is one; trusted code).

    The program is not PID 1 itself because PID 1 ignores signals it has no handler for (a
    program's own os.kill(os.getpid(), SIGSEGV) would do nothing) and must reap orphans. This
    process reaps everything, reports the program's wait status and exits, and the kernel then
    kills whatever the program left in the namespace.
    """
    err_read, err_write = err_pipe
    os.close(err_read)
    _prepare_workdir(libc, namespaces, workdir, uid, source)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    program = os.fork()
    if program == 0:
        try:
            _exec_program(libc, config, workdir, uid)
        except BaseException as e:  # noqa: BLE001
            os.write(err_write, f"{type(e).__name__}: {e}".encode()[:2000])
        os._exit(127)
    os.close(err_write)
    while True:
        pid, wait_status = os.wait()
        if pid == program:
            break
    os.write(result_write, json.dumps(dict(
        exit_code=os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else None,
        signal=os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None)).encode())


def _launcher_main(config_json: str):
    config = json.loads(config_json)
    os.set_inheritable(config["status_fd"], False)
    status = os.fdopen(config["status_fd"], "w")

    def report(**kw):
        status.write(json.dumps(kw) + "\n")
        status.flush()

    os.umask(0o022)
    libc = _libc()
    is_root = os.geteuid() == 0
    uid = config["uid"]
    with open(os.path.join(config["host_dir"], "program.py"), "rb") as f:
        source = f.read()  # before /tmp (where host_dir lives) is covered by the private tmpfs
    try:
        namespaces = _enter_namespaces(libc, is_root)
        writable = None
        if "mnt" in namespaces:
            workdir, writable = _lock_filesystem(libc, config, uid)
        else:
            workdir = os.path.join(config["host_dir"], "work")
            os.mkdir(workdir)
            if uid is not None:
                for prefix in config["python_prefixes"]:
                    if _blocked_ancestor(prefix) is not None:
                        raise OSError(
                            f"the interpreter under {prefix} is not reachable by uid {uid} and "
                            "there is no mount namespace to expose it (needs CAP_SYS_ADMIN); "
                            "install Python in a world-readable prefix")
    except Exception as e:  # noqa: BLE001 - reported to the parent as a setup failure
        report(error=f"{type(e).__name__}: {e}")
        return
    isolation = {
        "network": "netns (no interfaces up)" if "net" in namespaces else "none",
        "filesystem": ("read-only mounts + private tmpfs workdir" if "mnt" in namespaces
                       else "file permissions of the sandbox uid" if uid is not None
                       else "none"),
        "processes": ("pid namespace" if "pid" in namespaces
                      else "uid sweep" if uid is not None else "process group"),
        "writable_mounts": writable,  # besides the private /tmp; None: nothing re-mounted
        "uid": uid if uid is not None else os.getuid(),
        "namespaces": sorted(namespaces),
    }
    report(isolation=isolation)

    err_pipe = os.pipe()  # close-on-exec: EOF without data means the exec happened
    result_read, result_write = os.pipe()
    start = time.monotonic()
    init = os.fork()
    if init == 0:
        code = 0
        try:
            os.close(config["status_fd"])  # only the launcher may hold the report pipe
            os.close(result_read)
            _init_main(libc, config, namespaces, workdir, uid, source, err_pipe, result_write)
        except BaseException as e:  # noqa: BLE001
            os.write(err_pipe[1], f"init: {type(e).__name__}: {e}".encode()[:2000])
            code = 127
        os._exit(code)
    os.close(err_pipe[1])
    os.close(result_write)
    timed_out = []

    def on_alarm(signum, frame):
        timed_out.append(True)
        os.kill(init, signal.SIGKILL)  # still our unreaped child: the pid cannot be reused

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, config["timeout_s"])
    setup_error = _read_all(err_pipe[0])
    os.waitpid(init, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    wall = time.monotonic() - start
    result = _read_all(result_read)
    if setup_error:
        report(error=setup_error.decode("utf-8", "replace"))
        return
    final = json.loads(result) if result else dict(exit_code=None, signal=signal.SIGKILL)
    report(exit=dict(timed_out=bool(timed_out), wall_s=wall, **final))


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return data

