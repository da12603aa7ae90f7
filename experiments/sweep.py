"""Ablation sweeps: a base config × settings (a grid or a list of override sets) × seeds.

    python experiments/sweep.py --config experiments/configs/quickstart.py \
        --grid 'model.rope.fraction=0.25,1.0' --grid 'train.learning_rate=1e-3,3e-3' \
        --seeds 0,1 --out runs/sweep_x --parallel 2 [--steps 200] [--set train.eval_every=50]
    python experiments/sweep.py --config cfg.py --sweep_file sweep.json --out runs/y
    python experiments/sweep.py --config experiments/configs/repro_fim.py --out runs/fim
        # the config file's get_sweep(variant) defines the settings
    python experiments/sweep.py ... --emit slurm [--sbatch '--time=01:00:00']

Each run is `launch.py --config CFG --workdir OUT/<setting>/seed<k> --config.KEY=VALUE ...` in a
subprocess (--parallel at a time; the seed sets train.seed and data.seed). Every run's
overrides are validated against the config schema before anything runs. Re-running the same
command skips finished runs (never touching them) and resumes unfinished ones from their
checkpoints. At the end, OUT holds results.csv (one row per run), results.md (mean ± std over
seeds per setting), loss_curves.png and final_metrics.png.

`--emit slurm` writes OUT/sweep.sbatch (a job array, one task per run) and OUT/runs.json, and
runs nothing; after the array job the same command without --emit writes the report.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from jaxlm.schema import ConfigError  # noqa: E402
from jaxlm.sweeps import report, runner, spec  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="base config file path.py[:variant]")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis (repeatable; the settings are the product)")
    p.add_argument("--sweep_file", help="JSON: {grid: {...}, runs: [...], set: {...}, seeds}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every run (repeatable)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the sweep's, else 0)")
    p.add_argument("--seed_fields", default=",".join(spec.SEED_FIELDS),
                   help="config fields set to the seed")
    p.add_argument("--steps", type=int, help="train.steps of every run")
    p.add_argument("--out", help="sweep directory")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (local)")
    p.add_argument("--emit", choices=["slurm"], help="write a job script instead of running")
    p.add_argument("--sbatch", action="append", default=[], metavar="=--time=1:00:00",
                   help="extra #SBATCH line for --emit slurm (repeatable)")
    p.add_argument("--compile_cache", default="auto",
                   help="persistent XLA compilation cache shared by the runs (auto: "
                        "OUT/compile_cache; none: off)")
    p.add_argument("--report_only", action="store_true", help="only (re)write the report")
    p.add_argument("--title", default="", help="title of results.md and the plots")
    p.add_argument("--run_list", help=argparse.SUPPRESS)   # a SLURM array task:
    p.add_argument("--index", type=int, help=argparse.SUPPRESS)  # run entry INDEX of it
    return p.parse_args(argv)


def build_runs(args) -> tuple[str, list[spec.Run]]:
    if not args.config:
        raise ConfigError("--config: expected a config file path.py[:variant]")
    if not args.out:
        raise ConfigError("--out: expected the sweep directory")
    if args.parallel < 1:
        raise ConfigError(f"--parallel={args.parallel}: expected >= 1")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps={args.steps}: expected >= 1")
    path, variant = spec.config_path(args.config)
    config = os.path.abspath(path) + (f":{variant}" if variant else "")
    settings, common, seeds = [], [], None
    definitions = []
    if not args.grid and not args.sweep_file:
        found = spec.config_sweep(config)
        if found:
            definitions.append(found)
    if args.sweep_file:
        definitions.append(spec.read_sweep_file(args.sweep_file))
    for d in definitions:
        settings += d["settings"]
        common += d["common"]
        seeds = d["seeds"] or seeds
    if args.grid:
        settings += spec.grid_settings(spec.parse_grid(args.grid))
    common += [spec.parse_assignment(s, "--set") for s in args.set]
    if not settings:
        settings = [("base", ())]
    if args.seeds:
        seeds = spec.parse_seeds(args.seeds)
    seed_fields = [f for f in spec.split_values(args.seed_fields) if f]
    runs = spec.make_runs(settings, seeds or [0], os.path.abspath(args.out),
                          common=tuple(common), steps=args.steps, seed_fields=seed_fields)
    return config, runs


def run_one_from_list(args) -> int:
    """A SLURM array task: run entry --index of --run_list unless it is finished."""
    config, runs = runner.read_run_list(args.run_list)
    if args.index is None or not 0 <= args.index < len(runs):
        raise ConfigError(f"--index={args.index}: expected 0 <= index < {len(runs)}")
    run = runs[args.index]
    steps = spec.validate_overrides(config, run.overrides).train.steps
    if runner.is_finished(run, steps):
        print(f"{run.setting} seed {run.seed}: already finished; nothing to do")
        return 0
    out = os.path.dirname(args.run_list)
    result = runner.execute(run, config, steps, runner.log_path(out, run),
                            runner.compile_cache_env(os.path.join(out, "compile_cache")))
    return 0 if result["finished"] else 1


def main(argv) -> int:
    args = parse_args(argv)
    if args.run_list:
        return run_one_from_list(args)
    config, runs = build_runs(args)
    configs = spec.validate_runs(config, runs)
    steps_of = lambda run: configs[run.workdir].train.steps  # noqa: E731
    for run in runs:
        if runner.is_finished(run, steps_of(run)):
            runner.check_finished_config(run, configs[run.workdir])
    out = os.path.abspath(args.out)
    if args.emit == "slurm":
        script, run_list = runner.emit_slurm(runs, config, out, parallel=(
            args.parallel if args.parallel > 1 else None), sbatch_lines=args.sbatch)
        print(f"wrote {script} ({len(runs)} array tasks) and {run_list}; submit with: "
              f"sbatch {script}")
        return 0
    os.makedirs(out, exist_ok=True)
    runner.write_json(os.path.join(out, runner.MANIFEST),
                      {"config": config, "runs": [r.to_json() for r in runs]})
    failed = []
    if not args.report_only:
        cache = (None if args.compile_cache == "none" else
                 os.path.join(out, "compile_cache") if args.compile_cache == "auto"
                 else args.compile_cache)
        results = runner.run_all(runs, config, steps_of, out, parallel=args.parallel,
                                 env=runner.compile_cache_env(cache))
        failed = [r for r in results if not r["finished"]]
    rows = report.write_report(out, runs, steps_of, title=args.title)
    done = sum(r["status"] == "finished" for r in rows)
    print(f"report: {out}/results.csv, results.md, loss_curves.png, final_metrics.png "
          f"({done}/{len(rows)} runs finished)")
    for result in failed:
        run = result["run"]
        print(f"failed: {run.setting} seed {run.seed} (exit {result['returncode']}); see "
              f"{runner.log_path(out, run)}", file=sys.stderr)
    return 1 if failed else 0


def cli(argv) -> int:
    """main() with bad input reported as one line `error: ...` on stderr and status 2."""
    try:
        return main(argv)
    except ConfigError as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 2


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
