"""Running a sweep's launches: locally N at a time, or as a SLURM array script.

A run is *finished* when its workdir has the sweep's done marker (written after launch.py
exited 0 with the final step logged) or, for runs launched some other way (a SLURM array task
that died before writing it), when metrics.jsonl holds the held-out loss at step train.steps.
Finished runs are never launched again, so nothing in their directory is touched. Anything
else is launched with the same command; launch.py resumes it from its newest checkpoint.

Every local run logs its stdout/stderr to <out>/logs/<setting>__seed<k>.log (not into the
workdir: launch.py refuses a non-empty directory without a config.json).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

from jaxlm.sweeps.spec import Run

DONE = "sweep_done.json"
MANIFEST = "sweep.json"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "experiments", "launch.py")
SWEEP = os.path.join(ROOT, "experiments", "sweep.py")


def read_metrics(workdir: str) -> list[dict]:
    """The records of <workdir>/metrics.jsonl (a torn last line is ignored)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def final_step_logged(workdir: str, steps: int) -> bool:
    return any(r.get("step") == steps and "eval/loss" in r for r in read_metrics(workdir))


def is_finished(run: Run, steps: int) -> bool:
    marker = os.path.join(run.workdir, DONE)
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as f:
                if json.load(f).get("steps") == steps:
                    return True
        except (OSError, json.JSONDecodeError):
            pass
    return final_step_logged(run.workdir, steps)


# Fields that may differ between launches of one run without changing what it measures.
VOLATILE = {"train": ("progress_bar", "log_every", "checkpoint_every", "keep_checkpoints",
                      "async_checkpoint"), "parallel": None, "generate": None}


def config_dict(cfg) -> dict:
    """A parsed config as the JSON dict launch.py writes to <workdir>/config.json."""
    import dataclasses
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _difference(old, new, prefix: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _difference(old.get(key), new.get(key), f"{prefix}.{key}")
            if found:
                return found
        return None
    return None if old == new else prefix


def check_finished_config(run: Run, cfg) -> None:
    """A finished run is skipped, so its config must be the one asked for now: otherwise its
    numbers would be reported under the wrong setting. Raises ConfigError naming the field."""
    from jaxlm.schema import ConfigError
    path = os.path.join(run.workdir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    new = config_dict(cfg)
    for section, volatile in VOLATILE.items():
        if volatile is None:
            old.pop(section, None), new.pop(section, None)
        else:
            for name in volatile:
                old.get(section, {}).pop(name, None), new.get(section, {}).pop(name, None)
    field = _difference(old, new, "config")
    if field:
        raise ConfigError(f"{run.workdir} holds a finished run whose {field[7:]} differs from "
                          "this sweep's; it is kept as it is: use a new --out (or move that "
                          "run away)")


def log_path(out: str, run: Run) -> str:
    return os.path.join(out, "logs", f"{run.setting}__seed{run.seed}.log")


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def execute(run: Run, config: str, steps: int, log_file: str, env: dict | None = None,
            extra_args: Sequence[str] = ()) -> dict:
    """Launches one run (blocking); writes the done marker when it finished. Returns
    {run, returncode, wall_time_s, finished}."""
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    command = [sys.executable, LAUNCH, *run.launch_args(config), "--nosample", *extra_args]
    start = time.time()
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=env).returncode
    wall = time.time() - start
    finished = code == 0 and final_step_logged(run.workdir, steps)
    if finished:
        previous = _previous_wall(log_file)
        write_json(os.path.join(run.workdir, DONE),
                   {"steps": steps, "wall_time_s": wall + previous, "returncode": code,
                    "command": command})
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"# exit {code} after {wall:.1f}s\n")
    return {"run": run, "returncode": code, "wall_time_s": wall, "finished": finished}


def _previous_wall(log_file: str) -> float:
    """Seconds spent by earlier, interrupted launches of this run (from its log)."""
    total = 0.0
    with open(log_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for line in lines[:-1]:
        if line.startswith("# exit ") and " after " in line:
            try:
                total += float(line.rsplit(" after ", 1)[1].rstrip("s"))
            except ValueError:
                pass
    return total


def compile_cache_env(cache_dir: str | None) -> dict:
    """The environment of the launches: with a persistent XLA compilation cache shared by the
    sweep's runs (settings that change only values the compiler never sees, such as seeds,
    reuse each other's executables)."""
    env = dict(os.environ)
    if cache_dir:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(cache_dir))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    return env


def run_all(runs: Sequence[Run], config: str, steps_of: Callable[[Run], int], out: str, *,
            parallel: int = 1, env: dict | None = None,
            report: Callable[[str], None] = print) -> list[dict]:
    """Launches every unfinished run, `parallel` at a time; returns one result per launch."""
    todo = [r for r in runs if not is_finished(r, steps_of(r))]
    report(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already finished, "
           f"{len(todo)} to run ({parallel} at a time)")
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {pool.submit(execute, r, config, steps_of(r), log_path(out, r), env): r
                   for r in todo}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            run = result["run"]
            status = "done" if result["finished"] else f"FAILED (exit {result['returncode']})"
            report(f"  {run.setting} seed {run.seed}: {status} in "
                   f"{result['wall_time_s']:.0f}s; log {log_path(out, run)}")
            results.append(result)
    return results


# ---- SLURM --------------------------------------------------------------------------------

def emit_slurm(runs: Sequence[Run], config: str, out: str, *, parallel: int | None = None,
               sbatch_lines: Sequence[str] = (), job_name: str | None = None) -> tuple[str, str]:
    """Writes <out>/runs.json (the run list) and <out>/sweep.sbatch (one array task per run,
    each `sweep.py --run_list runs.json --index $SLURM_ARRAY_TASK_ID`, which skips a finished
    run and writes the done marker). Runs nothing; returns (script path, run list path)."""
    out = os.path.abspath(out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    run_list = os.path.join(out, "runs.json")
    write_json(run_list, {"config": os.path.abspath(config.partition(":")[0])
                          + (":" + config.partition(":")[2] if ":" in config else ""),
                          "runs": [r.to_json() for r in runs]})
    array = f"0-{len(runs) - 1}" + (f"%{parallel}" if parallel else "")
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={job_name or os.path.basename(out)}",
             f"#SBATCH --array={array}",
             f"#SBATCH --output={out}/logs/slurm_%A_%a.log",
             "#SBATCH --ntasks=1",
             *[f"#SBATCH {line}" for line in sbatch_lines],
             "",
             f"# {len(runs)} runs of {config}; task i runs entry i of runs.json:",
             *[f"#   {i}: {r.setting} seed {r.seed}" for i, r in enumerate(runs)],
             "# After the array job: the same sweep.py command (without --emit) only writes",
             "# results.csv / results.md / plots, since every finished run is skipped.",
             "set -euo pipefail",
             f"cd {shlex.quote(ROOT)}",
             f"exec {shlex.quote(sys.executable)} {shlex.quote(SWEEP)} --run_list "
             f"{shlex.quote(run_list)} --index \"$SLURM_ARRAY_TASK_ID\"",
             ""]
    script = os.path.join(out, "sweep.sbatch")
    with open(script, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.chmod(script, 0o755)
    return script, run_list


def read_run_list(path: str) -> tuple[str, list[Run]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data["config"], [Run.from_json(r) for r in data["runs"]]
