"""The mixtral (+ fine-grained), granite_hybrid and mamba2 families: preset shapes against an
independent parameter count and the published Mixtral-8x7B size, consistency with the HF
config converters, tiny models training through experiments/launch.py, and bad input.
"""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxlm.config import default_config, parse_config
from jaxlm.interop import granite as hf_granite
from jaxlm.interop import mamba2 as hf_mamba2
from jaxlm.interop import mixtral as hf_mixtral
from jaxlm.models import presets
from jaxlm.models.config import ModelConfig
from jaxlm.models.decoder import Decoder
from jaxlm.schema import ConfigError, from_config_dict, to_config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "experiments", "launch.py")
CONFIGS = os.path.join(ROOT, "experiments", "configs")

FAMILY_SIZES = [(family, size) for family in ("mixtral", "granite_hybrid", "mamba2")
                for size in presets.sizes(family)]
CONVERTERS = {"mixtral": hf_mixtral, "granite_hybrid": hf_granite, "mamba2": hf_mamba2}


# ---- presets ---------------------------------------------------------------------------------

def count_by_formula(cfg: ModelConfig) -> int:
    """Parameters from the config alone (SPEC shapes), not from the modules."""
    d, v = cfg.embed_dim, cfg.vocab_size
    total = v * d * (1 if cfg.tie_embeddings else 2) + d  # embeddings (+ lm_head), final norm
    for kind in cfg.layer_kinds:
        total += d  # mixer norm
        if kind == "attention":
            hd = cfg.head_size
            total += d * cfg.num_heads * hd * 2 + d * cfg.kv_heads * hd * 2  # q, o; k, v
        else:
            s = cfg.ssm
            d_in, gn = s.num_heads * s.head_dim, s.num_groups * s.state_dim
            total += d * (2 * d_in + 2 * gn + s.num_heads)                  # in_proj z|x|B|C|dt
            total += (s.conv_width + int(s.conv_bias)) * (d_in + 2 * gn)      # conv (+ bias)
            total += 3 * s.num_heads + d_in + d_in * d                       # dt_bias A_log D, norm, out
        if cfg.ffn == "moe":
            m = cfg.moe
            total += d + d * m.num_experts + 3 * m.num_experts * d * m.mlp_dim
            total += 3 * d * m.num_shared_experts * (m.shared_mlp_dim or m.mlp_dim)
        elif cfg.ffn == "mlp":
            total += d + 3 * d * cfg.mlp_dim
    return total


@pytest.mark.parametrize("family,size", FAMILY_SIZES)
def test_presets_build_abstractly_with_the_formula_parameter_count(family, size):
    cfg = presets.get(family, size)
    shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0),
                                                      jnp.zeros((1, 8), jnp.int32)))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
    assert count == count_by_formula(cfg)
    if (family, size) == ("mixtral", "8x7b"):
        assert count == 46_702_792_704  # mistralai/Mixtral-8x7B-v0.1


def test_preset_traits_are_the_issue_shapes():
    mixtral, fine = presets.get("mixtral", "8x7b"), presets.get("mixtral", "fine-grained-7b")
    assert (mixtral.moe.num_experts, mixtral.moe.top_k, mixtral.moe.num_shared_experts,
            mixtral.moe.router, mixtral.moe.renormalize) == (8, 2, 0, "softmax_topk", True)
    assert (fine.moe.num_experts, fine.moe.top_k, fine.moe.num_shared_experts) == (64, 8, 1)
    g = presets.get("granite_hybrid", "h-tiny")
    assert g.layer_kinds.count("attention") == 4 and g.num_layers == 40
    assert (g.embed_dim, g.num_heads, g.kv_heads, g.head_size, g.vocab_size) == (
        1536, 12, 4, 128, 100352)
    assert (g.attention_scale, g.embedding_multiplier, g.residual_multiplier,
            g.logits_divisor, g.position_embedding) == (1 / 128, 12.0, 0.22, 6.0, "none")
    assert (g.moe.num_experts, g.moe.top_k, g.moe.mlp_dim, g.moe.shared_mlp_dim,
            g.moe.router) == (64, 6, 512, 1024, "topk_softmax")
    assert (g.ssm.num_heads, g.ssm.head_dim, g.ssm.state_dim, g.ssm.num_groups,
            g.ssm.conv_width) == (48, 64, 128, 1, 4)
    m = presets.get("mamba2", "130m")
    assert (m.layer_pattern, m.ffn, m.position_embedding) == ("M", "none", "none")


@pytest.mark.parametrize("family,size", FAMILY_SIZES)
def test_presets_survive_the_hf_config_round_trip(family, size):
    """Exporting a preset's config.json and importing it back gives the preset: the families
    set the same fields the converters do. (Tiny sizes keep a router z-loss, which HF lacks.)"""
    converter = CONVERTERS[family]
    cfg = presets.get(family, size)
    if family == "mixtral" and cfg.moe.num_shared_experts:
        with pytest.raises(ValueError, match="num_shared_experts"):
            converter.config_to_hf(cfg)  # Mixtral has no shared expert
        return
    back = from_config_dict(ModelConfig, converter.config_from_hf(converter.config_to_hf(cfg)))
    if size.endswith("tiny") and cfg.ffn == "moe":
        assert back.moe.z_loss_coef == 0.0
        back = from_config_dict(ModelConfig, dict(to_config_dict(back).to_dict(),
                                                  moe=dict(to_config_dict(back.moe).to_dict(),
                                                           z_loss_coef=cfg.moe.z_loss_coef)))
    assert back == cfg


# ---- training through launch.py --------------------------------------------------------------

SMALL = ["--nosample", "--config.model.embed_dim=64", "--config.model.num_layers=2",
         "--config.data.seq_len=64", "--config.data.batch_size=8",
         "--config.train.progress_bar=False", "--config.train.eval_every=0",
         "--config.train.eval_batches=1", "--config.train.log_every=5",
         "--config.train.async_checkpoint=False"]
RUNS = {
    # 32 rows of 32 bytes: more documents per batch than 8 × 64, so a batch's load is less
    # about one file's bytes; a balancing coefficient of 0.3 (the library default is 0.01)
    # because byte-level code is dominated by a few bytes (spaces, newlines) that a fresh
    # router sends to the same experts, and 100 steps is all a test can spend undoing that.
    "mixtral": ["--config.model.moe.mlp_dim=128", "--config.model.moe.aux_loss_coef=0.3",
                "--config.data.batch_size=32", "--config.data.seq_len=32",
                "--config.train.steps=100", "--config.train.warmup_steps=40",
                "--config.train.checkpoint_every=100"],
    "granite_hybrid": ["--config.model.layer_pattern=MA", "--config.model.ssm.num_heads=4",
                       "--config.train.steps=40", "--config.train.warmup_steps=5",
                       "--config.train.checkpoint_every=40"],
    "mamba2": ["--config.model.ssm.num_heads=4", "--config.train.steps=40",
               "--config.train.warmup_steps=5", "--config.train.checkpoint_every=40"],
}


def launch_env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The three families trained concurrently (each run is mostly single-threaded compile and
    small ops, so running them side by side shortens the wall time)."""
    procs = {}
    for family, extra in RUNS.items():
        workdir = str(tmp_path_factory.mktemp(family))
        config = os.path.join(CONFIGS, f"{family}.py")
        procs[family] = (workdir, subprocess.Popen(
            [sys.executable, LAUNCH, "--config", config, "--workdir", workdir, *SMALL, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=launch_env()))
    out = {}
    for family, (workdir, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-2000:]
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        out[family] = [r for r in records if "loss" in r]
    return out


@pytest.mark.parametrize("family", sorted(RUNS))
def test_tiny_family_trains_through_launch_and_its_loss_falls(trained, family):
    losses = [r["loss"] for r in trained[family]]
    assert len(losses) >= 8
    first, last = losses[0], sum(losses[-3:]) / 3
    # ln(384) = 5.95 nats at the start; Granite's multipliers (logits ÷ 6) slow the start most
    assert last < first - 0.75, losses


def test_mixtral_expert_load_stays_within_2x_of_uniform(trained):
    """model/expert_load_max_over_uniform is each layer's busiest-expert share × E on that
    step's batch, averaged over the (2) layers by the training log. Early in training it
    reaches 3–4 (4 = every token picks one expert, E/top_k); in the last quarter of the run
    the balancing loss holds it under 2 on every logged step."""
    records = trained["mixtral"]
    assert all(r["aux/moe_aux"] > 0 for r in records)
    late = [r["model/expert_load_max_over_uniform"] for r in records if r["step"] >= 75]
    assert len(late) >= 5 and max(late) <= 2.0, late


# ---- bad input -------------------------------------------------------------------------------

def parse_with(family, size, **model):
    config = default_config()
    config.model = to_config_dict(presets.get(family, size))
    for key, value in model.items():
        section = config.model
        *parents, leaf = key.split(".")
        for p in parents:
            section = section[p]
        section[leaf] = value
    return parse_config(config)


@pytest.mark.parametrize("family,size,override,expected", [
    ("granite_hybrid", "tiny", {"layer_pattern": "MMXA"},
     "model.layer_pattern='MMXA': unknown letter 'X'"),
    ("granite_hybrid", "tiny", {"num_heads": 3, "num_kv_heads": 1},
     "model.num_heads=3: expected a divisor of embed_dim=128"),
    ("mixtral", "tiny", {"num_kv_heads": 3}, "model.num_kv_heads=3: expected a divisor"),
    ("mamba2", "tiny", {"ssm.num_groups": 3},
     "model.ssm.num_groups=3: expected a divisor of model.ssm.num_heads=8"),
    ("mamba2", "tiny", {"ssm.chunk_size": 0}, "model.ssm.chunk_size=0: expected >= 1"),
    ("granite_hybrid", "tiny", {"ssm.chunk_size": -4}, "model.ssm.chunk_size=-4: expected >= 1"),
    ("mixtral", "fine-grained-tiny", {"moe.top_k": 65},
     "model.moe.top_k=65: expected <= model.moe.num_experts=64"),
])
def test_bad_model_config_is_a_one_line_error(family, size, override, expected):
    with pytest.raises(ConfigError) as err:
        parse_with(family, size, **override)
    assert "\n" not in str(err.value)
    assert expected in str(err.value)


def test_launch_refuses_a_bad_pattern_in_one_line_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, LAUNCH, "--config", os.path.join(CONFIGS, "granite_hybrid.py"),
         "--workdir", str(workdir), "--config.model.layer_pattern=MMQA"],
        capture_output=True, text=True, cwd=ROOT, env=launch_env(), timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.layer_pattern='MMQA'" in lines[0], result.stderr
    assert not workdir.exists()


def test_expert_axis_not_dividing_experts_is_one_line_error(devices):
    """Under a mesh whose expert axis (4) does not divide E (6), the MoE layer refuses to trace
    and names the field; launch.py's pre-compile sharding check names the parameter too."""
    from jaxlm.layers.moe import MoE, MoEConfig
    from jaxlm.parallel import sharding
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.parallel.rules import DEFAULT_RULES
    from jaxlm.parallel.validate import ShardingError

    module = MoE(MoEConfig(num_experts=6, top_k=2, mlp_dim=4))
    x = jnp.zeros((8, 2, 8))
    with sharding.activation_sharding(make_mesh(data=2, expert=4), DEFAULT_RULES):
        with pytest.raises(ShardingError) as err:
            jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    assert "\n" not in str(err.value)
    assert "model.moe.num_experts=6: expected a multiple of the expert-parallel mesh size 4" in (
        str(err.value))


# ---- decoding-sized MoE dispatch -------------------------------------------------------------

def test_decode_sized_moe_reads_only_the_chosen_experts_and_matches_a_numpy_loop():
    """T·k ≤ E (a one-token decode step) takes `gathered_experts_ffn`; it must equal the
    per-assignment float64 loop Σ_j w_j · SwiGLU_{e_j}(x)."""
    import numpy as np

    from jaxlm.layers import moe

    rng = np.random.default_rng(0)
    t, k, e, d, i = 2, 4, 16, 8, 6
    x = rng.normal(size=(t, d)).astype(np.float32)
    experts = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    weights = rng.dirichlet(np.ones(k), size=t).astype(np.float32)
    wg, wu = (rng.normal(size=(e, d, i)).astype(np.float32) for _ in range(2))
    wo = rng.normal(size=(e, i, d)).astype(np.float32)
    got = moe.dropless_ffn(jnp.asarray(x), jnp.asarray(experts), jnp.asarray(weights),
                           jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wo))
    ref = np.zeros((t, d))
    f64 = lambda a: a.astype(np.float64)  # noqa: E731
    for row in range(t):
        for j in range(k):
            ex = experts[row, j]
            g, u = f64(x[row]) @ f64(wg[ex]), f64(x[row]) @ f64(wu[ex])
            ref[row] += weights[row, j] * ((g / (1 + np.exp(-g)) * u) @ f64(wo[ex]))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
