"""Direct preference optimisation (Rafailov et al. 2023) and its IPO / hinge variants.

A DPO batch holds pairs: every leaf is [pairs, 2, length] with index 0 the chosen and 1 the
rejected completion of the same prompt (`jaxlm.data.preference`), and `loss_mask` is 1 on
completion targets only. The sequence log-probability is

    log π(y|x) = Σ_t mask_t · log softmax(logits_{t})[target_t]        (float32)

(the logit at position t−1 predicts token t: targets are the inputs shifted by one). With
Δ = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]:

    sigmoid  −(1−ε) log σ(βΔ) − ε log σ(−βΔ)     (ε = label smoothing, cDPO; ε = 0 is DPO)
    ipo      (Δ̄ − 1/(2β))²                        (Δ̄ from length-averaged log-probs)
    hinge    max(0, 1 − βΔ)                       (SLiC)

The loss is the mean over pairs. Rewards are β·(log π_θ − log π_ref) of each completion (with
the same log-probs the loss uses, i.e. length-averaged for IPO); the logged accuracy is the
fraction of pairs whose chosen reward exceeds the rejected one, the margin their mean
difference.

The reference policy is frozen: its parameters are an *argument* of the jitted step (never a
closed-over constant, which XLA would embed in the executable), and it runs once per
micro-batch without gradients. `make_steps` builds the host-side step the loop calls; where the
reference parameters come from is `reference_params`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxlm.schema import ConfigError, field, section
from jaxlm.train import guard as guard_lib
from jaxlm.train.step import apply_model, split_micro_batches

LOSSES = ("sigmoid", "ipo", "hinge")


@section
class DPOConfig:
    loss: str = field("sigmoid", "preference loss: sigmoid (DPO, with label_smoothing: cDPO), "
                      "ipo (squared, on length-averaged log-probs) or hinge (SLiC)",
                      choices=LOSSES)
    beta: float = field(0.1, "β: strength of the KL tie to the reference policy", min=0.0,
                        min_exclusive=True)
    label_smoothing: float = field(0.0, "ε: assumed probability that a pair's labels are "
                                   "flipped (sigmoid loss only)", min=0.0, max=0.5)
    reference_workdir: str = field("", "run directory whose newest checkpoint is the frozen "
                                   "reference and the policy's starting point in a fresh run "
                                   "(empty: the run's own initialisation from train.seed)")

    def validate(self) -> None:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"train.dpo.label_smoothing={self.label_smoothing}: expected 0 "
                              f"with train.dpo.loss={self.loss!r} (label smoothing belongs to "
                              "the sigmoid loss)")


# ---- the math ----------------------------------------------------------------------------------

def sequence_logps(logits_btv, targets_bt, mask_bt):
    """(Σ_t mask·log p(target), Σ_t mask) per row, float32."""
    logits_btv = logits_btv.astype(jnp.float32)
    mask_bt = mask_bt.astype(jnp.float32)
    logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    target_logp_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.sum(target_logp_bt * mask_bt, axis=-1), jnp.sum(mask_bt, axis=-1)


def preference_loss(delta, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair loss as a function of Δ (for IPO, Δ̄ from length-averaged log-probs)."""
    delta = delta.astype(jnp.float32)
    if loss == "sigmoid":
        return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
                - label_smoothing * jax.nn.log_sigmoid(-beta * delta))
    if loss == "ipo":
        return jnp.square(delta - 1.0 / (2.0 * beta))
    if loss == "hinge":
        return jax.nn.relu(1.0 - beta * delta)
    raise ConfigError(f"train.dpo.loss={loss!r}: expected one of {list(LOSSES)}")


def pair_losses(policy_logps_p2, ref_logps_p2, lengths_p2, cfg: DPOConfig):
    """Per-pair losses and rewards from summed log-probs [pairs, 2] (0 chosen, 1 rejected).

    Returns (loss_p, chosen_reward_p, rejected_reward_p)."""
    policy, ref = policy_logps_p2.astype(jnp.float32), ref_logps_p2.astype(jnp.float32)
    if cfg.loss == "ipo":
        lengths = jnp.maximum(lengths_p2.astype(jnp.float32), 1.0)
        policy, ref = policy / lengths, ref / lengths
    log_ratio_p2 = policy - ref
    delta_p = log_ratio_p2[:, 0] - log_ratio_p2[:, 1]
    loss_p = preference_loss(delta_p, beta=cfg.beta, loss=cfg.loss,
                             label_smoothing=cfg.label_smoothing)
    rewards_p2 = cfg.beta * jax.lax.stop_gradient(log_ratio_p2)
    return loss_p, rewards_p2[:, 0], rewards_p2[:, 1]


def paired_logps(model, params, model_state, batch: dict):
    """Summed completion log-probs and completion lengths, both [pairs, 2]."""
    pairs, two, length = batch["inputs"].shape
    flat = {k: v.reshape(pairs * two, *v.shape[2:]) for k, v in batch.items()}
    logits, aux, _ = apply_model(model, params, model_state, flat, deterministic=True)
    logps, lengths = sequence_logps(logits, flat["targets"], flat["loss_mask"])
    return logps.reshape(pairs, two), lengths.reshape(pairs, two), aux


def pair_sums(loss_p, chosen_p, rejected_p, valid_p) -> dict:
    """Σ over valid pairs of what the step and the evaluation report (divide by 'pairs')."""
    return {"loss": jnp.sum(loss_p * valid_p), "pairs": jnp.sum(valid_p),
            "accuracy": jnp.sum((chosen_p > rejected_p) * valid_p),
            "margin": jnp.sum((chosen_p - rejected_p) * valid_p),
            "chosen": jnp.sum(chosen_p * valid_p), "rejected": jnp.sum(rejected_p * valid_p)}


def valid_pairs(batch: dict):
    """1 for a real pair, 0 for a padding pair (no completion tokens on either side)."""
    return (jnp.sum(batch["loss_mask"], axis=(1, 2)) > 0).astype(jnp.float32)


# ---- jitted steps ------------------------------------------------------------------------------

def make_dpo_step(model, tx: optax.GradientTransformation, schedule: Callable, cfg: DPOConfig, *,
                  accum_steps: int = 1):
    """(state, ref_params, batch) -> (state, metrics); batch leaves [pairs, 2, length].

    Pairs are split into `accum_steps` micro-batches whose gradients add up inside one
    `lax.scan`; the objective is the mean over all pairs of the batch (plus the model's
    auxiliary losses), so accumulation does not change the update. A step whose loss or
    gradient norm is not finite changes nothing and reports `nonfinite` = 1 (as the LM step).
    Both forward passes are deterministic and leave the model state (e.g. the MoE selection
    bias) as it is: preference tuning does not re-balance the router."""
    def train_step(state, ref_params, batch):
        micro = split_micro_batches(batch, accum_steps)
        total_pairs = jnp.maximum(jnp.sum(valid_pairs(batch)), 1.0)

        def micro_step(carry, mb):
            grads_acc, sums = carry
            ref_logps, _, _ = paired_logps(model, ref_params, state.model_state, mb)
            ref_logps = jax.lax.stop_gradient(ref_logps)
            valid = valid_pairs(mb)

            def objective(params):
                logps, lengths, aux = paired_logps(model, params, state.model_state, mb)
                loss_p, chosen, rejected = pair_losses(logps, ref_logps, lengths, cfg)
                aux_loss = sum(aux["losses"].values(), jnp.zeros((), jnp.float32))
                value = jnp.sum(loss_p * valid) / total_pairs + aux_loss / accum_steps
                return value, (pair_sums(loss_p, chosen, rejected, valid), logps, lengths)

            grads, (mb_sums, logps, lengths) = jax.grad(objective, has_aux=True)(state.params)
            mb_sums["chosen_logp"] = jnp.sum(logps[:, 0] * valid)
            mb_sums["rejected_logp"] = jnp.sum(logps[:, 1] * valid)
            mb_sums["tokens"] = jnp.sum(lengths)
            return (jax.tree.map(jnp.add, grads_acc, grads),
                    jax.tree.map(jnp.add, sums, mb_sums)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        keys = ("loss", "pairs", "accuracy", "margin", "chosen", "rejected", "chosen_logp",
                "rejected_logp", "tokens")
        sums0 = {k: jnp.zeros((), jnp.float32) for k in keys}
        (grads, sums), _ = jax.lax.scan(micro_step, (zeros, sums0), micro)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        n = total_pairs
        metrics = {"loss": sums["loss"] / n, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step), "tokens": sums["tokens"],
                   "pairs": sums["pairs"],
                   "rewards/accuracy": sums["accuracy"] / n, "rewards/margin": sums["margin"] / n,
                   "rewards/chosen": sums["chosen"] / n, "rewards/rejected": sums["rejected"] / n,
                   "logps/chosen": sums["chosen_logp"] / n,
                   "logps/rejected": sums["rejected_logp"] / n}
        finite = guard_lib.is_finite(metrics["loss"], metrics["grad_norm"])
        params, opt_state = guard_lib.keep_if_finite(finite, (params, opt_state),
                                                     (state.params, state.opt_state))
        metrics["nonfinite"] = 1 - finite.astype(jnp.int32)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_dpo_eval_step(model, cfg: DPOConfig):
    """(params, ref_params, model_state, batch) -> pair sums (loss, pairs, accuracy, margin,
    chosen, rejected), so evaluations over several batches add up exactly."""

    def eval_step(params, ref_params, model_state, batch):
        logps, lengths, _ = paired_logps(model, params, model_state, batch)
        ref_logps, _, _ = paired_logps(model, ref_params, model_state, batch)
        loss_p, chosen, rejected = pair_losses(logps, ref_logps, lengths, cfg)
        return pair_sums(loss_p, chosen, rejected, valid_pairs(batch))

    return eval_step


# ---- what the training loop calls --------------------------------------------------------------

def reference_params(cfg, run):
    """The frozen reference, placed like the policy's params: the newest checkpoint of
    train.dpo.reference_workdir, or else the initialisation of train.seed (what a fresh run's
    policy starts from, recomputed identically on every resume)."""
    from jaxlm.train import state as state_lib
    path = cfg.train.dpo.reference_workdir
    if not path:
        state = state_lib.create_state(run.model, run.tx, jax.random.key(cfg.train.seed),
                                       cfg.data.seq_len, run.state_shardings)
        return state.params
    from jaxlm.surgery.rundir import read_run
    reference = read_run(path)
    if reference.cfg.model != cfg.model:
        differs = next(f for f in cfg.model.__dataclass_fields__
                       if getattr(reference.cfg.model, f) != getattr(cfg.model, f))
        raise ConfigError(f"train.dpo.reference_workdir={path!r}: its model.{differs}="
                          f"{getattr(reference.cfg.model, differs)!r} differs from this run's "
                          f"{getattr(cfg.model, differs)!r}")
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x, x.shape),
                        reference.params, run.state_shardings.params)


def make_steps(cfg, run):
    """(train_step(state, host pairs) -> (state, metrics), eval_step(params, model_state,
    pairs) -> (Σ pair loss, pairs)) with the reference parameters held here."""
    from jaxlm.parallel import distributed, sharding
    tcfg, replicated = cfg.train, sharding.replicated(run.mesh)
    ref = reference_params(cfg, run)
    sh = run.state_shardings
    step = jax.jit(make_dpo_step(run.model, run.tx, run.schedule, tcfg.dpo,
                                 accum_steps=tcfg.grad_accum_steps),
                   in_shardings=(sh, sh.params, run.batch_sharding),
                   out_shardings=(sh, replicated), donate_argnums=(0,))
    evaluate = jax.jit(make_dpo_eval_step(run.model, tcfg.dpo), out_shardings=replicated)

    def train_step(state, batch):
        return step(state, ref, distributed.global_batch(batch, run.batch_sharding,
                                                         cfg.data.batch_size))

    def eval_step(params, model_state, batch):
        sums = evaluate(params, ref, model_state, batch)
        return sums["loss"], sums["pairs"]

    return train_step, eval_step
