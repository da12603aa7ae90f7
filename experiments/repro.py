"""Reproductions with phases (train -> up-scale -> continue), built on the sweep machinery.

    python experiments/repro.py upscaling [--out runs/repro_upscaling] [--seeds 0,1]
        [--parallel 2] [--results experiments/results]

`upscaling` (experiments/configs/repro_upscaling.py) regenerates reproductions 1 (SOLAR) and 2
(Yi-9B) from one set of runs:
  1. a base run per seed (the sweep runner: skipped when finished);
  2. per seed, every arm of ARMS made from the base's final checkpoint by
     `launch.py --mode upscale` (step 0, fresh optimizer), and its held-out loss right after
     surgery by `launch.py --mode eval` (<arm>/step0_eval.json);
  3. continued pretraining of every arm (`--config repro_upscaling.py:continue`);
  4. the base's per-layer input/output cosine similarity on held-out batches;
  5. <results>/solar (base_continued vs solar_middle) and <results>/yi (solar_middle vs
     yi_late, plus the cosines): results.csv/md, loss_curves.png, final_metrics.png and
     extra_tokens.png (held-out loss against extra tokens, from the moment of surgery).
Every phase is skipped when its output exists, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxlm.sweeps import report, runner, spec  # noqa: E402

CONFIG = os.path.join(ROOT, "experiments", "configs", "repro_upscaling.py")


def launch(args: list[str], log_file: str) -> str:
    """Runs launch.py (a mode other than train); returns its stdout, fails loudly."""
    command = [sys.executable, runner.LAUNCH, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}# exit "
                f"{result.returncode}\n")
    if result.returncode:
        sys.exit(f"repro: {' '.join(command[2:5])} failed; see {log_file}")
    return result.stdout


def base_runs(out: str, seeds: list[int]) -> list[spec.Run]:
    return spec.make_runs([("base", ())], seeds, out)


def arm_runs(out: str, seeds: list[int], arms: dict, layers: dict, data_seed: int):
    runs = []
    for arm in arms:
        for seed in seeds:
            overrides = (("model.num_layers", str(layers[arm])), ("train.seed", str(seed)),
                         ("data.seed", str(data_seed + seed)))
            runs.append(spec.Run(arm, seed, (("layer_map", arms[arm]),), overrides,
                                 os.path.join(out, arm, f"seed{seed}")))
    return runs


def upscaling(args) -> None:
    from experiments.configs import repro_upscaling as cfgmod
    from experiments.modes.upscale import parse_layer_map
    from jaxlm.surgery.upscale import expand_layer_map
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    env = runner.compile_cache_env(os.path.join(out, "compile_cache"))
    base_layers = cfgmod.get_config().model.num_layers
    sources = {arm: expand_layer_map(parse_layer_map(m, base_layers), base_layers)
               for arm, m in cfgmod.ARMS.items()}
    layers = {arm: len(s) for arm, s in sources.items()}

    # 1. base runs
    bases = base_runs(out, args.seeds)
    base_cfgs = spec.validate_runs(CONFIG, bases)
    results = runner.run_all(bases, CONFIG, lambda r: base_cfgs[r.workdir].train.steps, out,
                             parallel=args.parallel, env=env)
    if any(not r["finished"] for r in results):
        sys.exit("repro: a base run failed; see the logs above")

    # 2. surgery + loss right after it
    cont = f"{CONFIG}:continue"
    arms = arm_runs(out, args.seeds, cfgmod.ARMS, layers, cfgmod.CONTINUE_DATA_SEED)
    arm_cfgs = spec.validate_runs(cont, arms)
    for run in arms:
        base = next(b for b in bases if b.seed == run.seed)
        log = os.path.join(logs, f"surgery_{run.setting}_seed{run.seed}.log")
        if not os.path.isdir(run.workdir):
            launch(["--mode", "upscale", "--from_workdir", base.workdir, "--workdir",
                    run.workdir, "--layer_map", cfgmod.ARMS[run.setting], "--config", cont,
                    *[f"--config.{k}={v}" for k, v in run.overrides
                      if k != "model.num_layers"]], log)
        step0 = os.path.join(run.workdir, "step0_eval.json")
        if not os.path.isfile(step0):
            text = launch(["--mode", "eval", "--workdir", run.workdir, "--humaneval_limit=0",
                           "--infill_limit=0"], log)
            report_line = json.loads(text.strip().splitlines()[-1])
            runner.write_json(step0, report_line)

    # 3. continued pretraining
    results = runner.run_all(arms, cont, lambda r: arm_cfgs[r.workdir].train.steps, out,
                             parallel=args.parallel, env=env)
    if any(not r["finished"] for r in results):
        sys.exit("repro: a continued run failed; see the logs above")

    # 4. per-layer cosine of the bases
    cosines = {}
    for base in bases:
        path = os.path.join(base.workdir, "layer_cosine.json")
        if not os.path.isfile(path):
            runner.write_json(path, {"cosine": base_cosines(base.workdir)})
        with open(path, encoding="utf-8") as f:
            cosines[base.seed] = json.load(f)["cosine"]

    # 5. reports
    steps_of = lambda r: arm_cfgs[r.workdir].train.steps  # noqa: E731
    base_final = {b.seed: report.run_row(b, base_cfgs[b.workdir].train.steps) for b in bases}
    for name, keep in (("solar", ("base_continued", "solar_middle")),
                       ("yi", ("solar_middle", "yi_late"))):
        target = os.path.join(args.results, name)
        chosen = [r for r in arms if r.setting in keep]
        rows = report.write_report(target, chosen, steps_of, title=TITLES[name])
        extra = write_extra(target, chosen, rows, base_final, sources,
                            cosines if name == "yi" else None)
        print(f"{name}: {target}/results.md\n{extra}")


TITLES = {"solar": "SOLAR depth up-scaling vs continuing the base (equal extra tokens)",
          "yi": "Yi-9B: duplicating the last layers vs the middle layers (SOLAR-style)"}


def base_cosines(workdir: str) -> list[float]:
    """Mean cos(input, output) of every layer of the run's final checkpoint, on its config's
    held-out batches."""
    import numpy as np
    from jaxlm.data import pipeline
    from jaxlm.data.tokenizers import load_tokenizer
    from jaxlm.surgery import rundir
    from jaxlm.sweeps import analysis
    run = rundir.read_run(workdir)
    tokenizer = load_tokenizer(run.cfg.data)
    batches = pipeline.take(pipeline.heldout_dataset(run.cfg.data, tokenizer),
                            run.cfg.train.eval_batches)
    tokens = np.concatenate([b["inputs"] for b in batches])
    return [float(c) for c in analysis.layer_io_cosine(run.cfg.model, run.params, tokens)]


def write_extra(target: str, runs, rows, base_final, sources, cosines) -> str:
    """Appends the surgery table (and the cosines) to results.md; writes extra_tokens.png."""
    import numpy as np
    lines = ["", "## Right after surgery and after continued pretraining", "",
             "Held-out loss (nats/token) of each arm at step 0 of the continuation (the base's "
             "final checkpoint, possibly up-scaled) and after it; the base run's own final "
             "held-out loss for reference. Mean ± sample std over seeds.", "",
             "| arm | layers (source of each) | base final | right after surgery | after "
             "continuation | extra tokens |", "|---|---|---|---|---|---|"]
    step0 = {}
    for run in runs:
        with open(os.path.join(run.workdir, "step0_eval.json"), encoding="utf-8") as f:
            step0[(run.setting, run.seed)] = json.load(f)["eval_loss"]
    for arm in report.settings_in_order(rows):
        group = [r for r in rows if r["setting"] == arm]
        def ms(xs):
            xs = np.array(xs, np.float64)
            return f"{xs.mean():.4f} ± {xs.std(ddof=1) if xs.size > 1 else 0.0:.4f}"
        lines.append(
            f"| `{arm}` | {len(sources[arm])} ({','.join(map(str, sources[arm]))}) | "
            f"{ms([base_final[r['seed']]['eval_loss'] for r in group])} | "
            f"{ms([step0[(arm, r['seed'])] for r in group])} | "
            f"{ms([r['eval_loss'] for r in group])} | {group[0]['tokens']:,} |")
    if cosines:
        seeds = sorted(cosines)
        values = np.array([cosines[s] for s in seeds])
        lines += ["", "## Input/output cosine similarity of the base's layers", "",
                  "Mean over held-out tokens of cos(residual stream before layer l, after "
                  "layer l), per seed.", "",
                  "| layer | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        for layer in range(values.shape[1]):
            lines.append(f"| {layer} | " + " | ".join(f"{v:.4f}" for v in values[:, layer])
                         + f" | {values[:, layer].mean():.4f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(target, "results.md"), "a", encoding="utf-8") as f:
        f.write(text)
    plot_extra_tokens(os.path.join(target, "extra_tokens.png"), runs, step0, base_final)
    return text


def plot_extra_tokens(path, runs, step0, base_final) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm in dict.fromkeys(r.setting for r in runs):
        curves = []
        for run in (r for r in runs if r.setting == arm):
            cfg = report._config(run.workdir)["data"]
            per_step = cfg["batch_size"] * cfg["seq_len"]
            curve = [(0, step0[(arm, run.seed)])] + [
                (s * per_step, v) for s, v in report.run_curves(run.workdir)["eval/loss"]]
            curves.append(curve)
        x, mean, std = report.mean_curve(curves)
        (line,) = ax.plot(x / 1e3, mean, marker="o", markersize=3, label=f"{arm} (n={len(curves)})")
        ax.fill_between(x / 1e3, mean - std, mean + std, alpha=0.2, color=line.get_color())
    ax.axhline(np.mean([r["eval_loss"] for r in base_final.values()]), color="gray", ls="--",
               lw=1, label="base at the end of its run")
    ax.set_xlabel("extra tokens after surgery (thousands)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=["upscaling"])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "repro_upscaling"))
    p.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--parallel", type=int, default=2)
    args = p.parse_args(argv)
    args.seeds = spec.parse_seeds(args.seeds)
    upscaling(args)


if __name__ == "__main__":
    main(sys.argv[1:])
