"""--mode dpo: direct preference optimisation on align.path's {prompt, chosen, rejected} rows.

    launch.py --mode dpo --config experiments/configs/dpo.py --workdir runs/dpo \
        [--config.train.dpo.reference_workdir=runs/sft]

The reference policy is frozen: the newest checkpoint of train.dpo.reference_workdir (a fresh
DPO run directory is first seeded from it at step 0, so the policy starts where the reference
is), or without one the run's own initialisation. Reward accuracy and margin are logged with
every training metric (metrics.jsonl: rewards/accuracy, rewards/margin, rewards/chosen,
rewards/rejected); eval/loss is the held-out pairs' mean DPO loss. Flags as --mode train.
"""

import os

from experiments.modes.sft import run_objective


def seed_from_reference(cfg, workdir: str) -> None:
    """A fresh workdir with a reference run: write its params as this run's step 0."""
    reference = cfg.train.dpo.reference_workdir
    if not reference or (os.path.isdir(workdir) and os.listdir(workdir)):
        return
    from jaxlm.surgery import rundir
    source = rundir.read_run(reference)
    if source.cfg.model != cfg.model:
        raise ValueError(f"train.dpo.reference_workdir={reference!r}: its model config "
                         "differs from this run's model config")
    rundir.write_run(workdir, cfg, source.params, source.model_state,
                     origin={"mode": "dpo", "reference": os.path.abspath(reference),
                             "step": source.step})
    print(f"seeded {workdir} from {reference} (step {source.step})")


def run(ctx) -> None:
    run_objective(ctx, "dpo", prepare=seed_from_reference)
