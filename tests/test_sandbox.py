"""The sandbox and the pass@k estimator.

Every sandbox test runs an adversarial program and checks the outcome from outside the sandbox
(files that must not exist, a server that must see no connection, /proc for leftover
processes), not only what the program reports about itself.
"""

import json
import math
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from jaxlm.evals.passk import aggregate_pass_at_k, pass_at_k
from jaxlm.evals.sandbox import processes_of, run_sandboxed

IS_ROOT = os.geteuid() == 0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- pass@k

def closed_form(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_hand_cases():
    assert pass_at_k(10, 10, 1) == 1.0  # every sample correct
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 0, 1) == 0.0  # none correct
    assert pass_at_k(10, 0, 10) == 0.0
    for n, c in [(1, 1), (1, 0), (5, 2), (20, 7), (200, 13)]:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, rel=1e-12, abs=1e-15)
    assert pass_at_k(10, 9, 2) == 1.0  # n - c < k: any two samples contain a correct one
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, rel=1e-12)  # 1 - C(3,2)/C(4,2)


def test_pass_at_k_matches_comb_on_random_cases():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 250)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), rel=1e-9, abs=1e-12)
    # Large n, where the binomials themselves overflow a float: stays a probability.
    value = pass_at_k(2000, 3, 100)
    assert value == pytest.approx(closed_form(2000, 3, 100), rel=1e-9)


def test_aggregate_pass_at_k_averages_and_skips_k_above_n():
    counts = {"a": (10, 3), "b": (10, 0), "c": (5, 5)}
    result = aggregate_pass_at_k(counts, ks=(1, 5, 10))
    assert result["pass@1"] == pytest.approx((0.3 + 0.0 + 1.0) / 3, rel=1e-12)
    assert result["pass@5"] == pytest.approx(
        (closed_form(10, 3, 5) + 0.0 + 1.0) / 3, rel=1e-12)
    assert "pass@10" not in result  # problem c has only 5 samples


@pytest.mark.parametrize("args, message", [
    ((5, 6, 1), "c=6"), ((5, 2, 0), "k=0"), ((5, 2, 6), "k=6"), ((-1, 0, 1), "n=-1")])
def test_pass_at_k_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(*args)


# ---------------------------------------------------------------- sandbox

@pytest.fixture(scope="module")
def isolation():
    """What this machine's kernel and privileges allow (see the sandbox module docstring)."""
    return run_sandboxed("pass").isolation


def require(isolation, namespace, guarantee):
    if namespace not in isolation["namespaces"]:
        pytest.skip(f"no {namespace} namespace here, so the sandbox does not guarantee "
                    f"{guarantee} (documented limit); isolation={isolation}")


def sandboxed_programs_of(uid):
    """Live processes of `uid` running a sandboxed program (forks keep the command line)."""
    found = []
    for pid in processes_of(uid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"program.py" in argv:
            found.append(pid)
    return found


def assert_no_leftovers(result):
    """Checked in /proc from outside: no process of the sandbox is still alive (as root the
    sandbox uid is unique to this run; otherwise look for sandboxed programs of our uid)."""
    if IS_ROOT:
        assert processes_of(result.isolation["uid"]) == []
    else:
        assert sandboxed_programs_of(os.getuid()) == []


def test_ordinary_program_outcomes(isolation):
    ok = run_sandboxed("import os\nprint(6 * 7, os.getcwd(), os.getuid())", timeout_s=10)
    assert ok.status == "passed" and ok.exit_code == 0
    answer, cwd, uid = ok.stdout.split()
    assert int(answer) == 42
    if IS_ROOT:  # runs as a fresh unprivileged uid
        assert int(uid) == ok.isolation["uid"] and int(uid) >= 1_000_000_000
    if "mnt" in isolation["namespaces"]:  # in its private tmpfs
        assert cwd == "/tmp"
    failed = run_sandboxed("import sys\nprint('x', file=sys.stderr)\nassert 1 == 2")
    assert failed.status == "failed" and failed.exit_code == 1
    assert "AssertionError" in failed.stderr
    assert run_sandboxed("import sys; sys.exit(3)").exit_code == 3
    # A signal the program sends itself still kills it (it is not PID 1 of its namespace).
    segv = run_sandboxed("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert segv.status == "killed" and segv.signal == 11


def test_environment_is_scrubbed():
    os.environ["JAXLM_SANDBOX_SECRET"] = "leak"
    try:
        r = run_sandboxed("import os, json; print(json.dumps(dict(os.environ)))")
    finally:
        del os.environ["JAXLM_SANDBOX_SECRET"]
    env = json.loads(r.stdout)
    assert "JAXLM_SANDBOX_SECRET" not in env
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "OMP_NUM_THREADS",
                        "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}


def test_infinite_loop_is_killed_within_timeout():
    start = time.monotonic()
    r = run_sandboxed("while True:\n    pass", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert r.status == "timeout"
    assert 1.0 <= r.wall_s < 2.0  # killed at the deadline (slack for a loaded machine)
    assert elapsed < 3.0  # + interpreter start and cleanup
    assert_no_leftovers(r)


def test_cpu_rlimit_kills_a_busy_program_before_a_long_wall_timeout():
    r = run_sandboxed("while True:\n    pass", timeout_s=30.0, cpu_s=1.0)
    assert r.status == "killed" and r.signal in (9, 24)  # SIGKILL at the hard limit / SIGXCPU
    assert r.wall_s < 10.0


def test_memory_hog_fails_cleanly_and_parent_is_unaffected():
    limit = 256 << 20
    before = resource.getrlimit(resource.RLIMIT_AS)
    big = run_sandboxed("x = bytearray(4 * 1024 ** 3)", memory_bytes=limit)
    assert big.status == "failed" and "MemoryError" in big.stderr
    growing = run_sandboxed("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))",
                            memory_bytes=limit, timeout_s=10.0)
    assert growing.status == "failed" and "MemoryError" in growing.stderr
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert len(bytearray(512 << 20)) == 512 << 20  # the parent can still allocate > limit


def test_output_is_capped():
    r = run_sandboxed("print('x' * 10 ** 8)", max_file_bytes=1 << 20, output_tail_bytes=100)
    assert r.status == "failed" and "File too large" in r.stderr
    assert r.stdout_bytes <= 1 << 20
    assert len(r.stdout) <= 100


def test_cannot_write_outside_its_temp_dir(isolation):
    require(isolation, "mnt", "that world-writable directories stay untouched")
    outside = tempfile.mkdtemp(prefix="jaxlm-sandbox-test-")
    os.chmod(outside, 0o777)  # world-writable: only the read-only mounts can stop the write
    targets = [os.path.join(REPO, "SANDBOX_WRITE_TEST"), os.path.join(outside, "x"),
               "/var/tmp/jaxlm_sandbox_write_test", "/dev/shm/jaxlm_sandbox_write_test"]
    program = "import json, os\nresults = {}\n"
    for path in targets:
        program += (f"try:\n    open({path!r}, 'w').write('x')\n    results[{path!r}] = 'wrote'\n"
                    f"except OSError as e:\n    results[{path!r}] = e.errno\n")
    program += ("open('inside.txt', 'w').write('hello')\n"
                "results['inside'] = open('inside.txt').read()\nprint(json.dumps(results))")
    try:
        r = run_sandboxed(program)
        assert r.status == "passed", r.stderr
        results = json.loads(r.stdout)
        assert results["inside"] == "hello"  # its own working directory is writable
        for path in targets:
            assert results[path] != "wrote"
            assert not os.path.exists(path), path  # checked from outside
        assert os.listdir(outside) == []
        assert r.isolation["writable_mounts"] == []
    finally:
        os.rmdir(outside)


def test_working_directory_is_removed_afterwards(monkeypatch):
    # a private parent directory: other test workers run sandboxes in the shared /tmp meanwhile
    parent = tempfile.mkdtemp(prefix="jaxlm-sandbox-test-")
    os.chmod(parent, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", parent)
    try:
        r = run_sandboxed("open('big.bin', 'wb').write(b'0' * 10 ** 6)\nimport os\nprint(os.getcwd())")
        assert r.status == "passed"
        assert os.listdir(parent) == []  # the host-side directory is gone; the tmpfs died too
    finally:
        os.rmdir(parent)


def test_cannot_open_a_network_connection(isolation):
    require(isolation, "net", "no network access")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # the server works
            pass
        server.accept()[0].close()
        program = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), "
                   f"timeout=2)\n    print('connected')\nexcept OSError as e:\n"
                   f"    print('refused', e.errno)\n    raise")
        r = run_sandboxed(program, timeout_s=10)
        assert r.isolation["network"].startswith("netns"), r.isolation
        assert r.status == "failed" and "connected" not in r.stdout.split()
        assert r.stdout.split()[0] == "refused"
        with pytest.raises(BlockingIOError):  # nobody knocked
            server.accept()
    finally:
        server.close()


def test_fork_bomb_is_bounded_and_leaves_nothing_behind(isolation):
    if not IS_ROOT:  # root: a fresh uid bounds and finds them; otherwise the PID namespace
        require(isolation, "pid", "that detached processes are cleaned up")
    # Children detach (setsid) and sleep: a process-group kill alone would miss them.
    bounded = run_sandboxed(
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            os.setsid(); time.sleep(60); os._exit(0)\n        n += 1\n"
        "except OSError as e:\n    print(n, e.errno)", max_processes=8, timeout_s=10)
    assert bounded.status == "passed"
    forks, errno = map(int, bounded.stdout.split())
    assert errno == 11 and forks < 8  # EAGAIN from RLIMIT_NPROC
    assert_no_leftovers(bounded)

    start = time.monotonic()
    bomb = run_sandboxed("import os\nwhile True:\n    try:\n        os.fork()\n"
                         "    except OSError:\n        pass", timeout_s=1.5, max_processes=16)
    assert bomb.status == "timeout"
    assert time.monotonic() - start < 5.0
    assert_no_leftovers(bomb)
    # The machine is still usable: the parent can start processes.
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).stdout == b"1\n"


def test_never_runs_in_the_evaluating_process():
    marker = "JAXLM_SANDBOX_MARKER"
    r = run_sandboxed(f"import os\nos.environ[{marker!r}] = '1'\nprint(os.getpid(), os.getppid())")
    assert marker not in os.environ
    pid = int(r.stdout.split()[0])
    assert pid != os.getpid()


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"timeout_s=0: expected a positive"):
        run_sandboxed("pass", timeout_s=0)
    with pytest.raises(ValueError, match=r"memory_bytes=1000: expected an int >= 64 MiB"):
        run_sandboxed("pass", memory_bytes=1000)
    with pytest.raises(ValueError, match=r"program='bytes'"):
        run_sandboxed(b"pass")
