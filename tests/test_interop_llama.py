"""LLaMA / Mistral interop against transformers (float32, eager attention): HF -> import -> jaxlm
logits, jaxlm -> export -> HF logits, sharded and bfloat16 checkpoints, peak import memory, and
one-line errors for bad input. Helpers here are shared with test_interop_stablelm.py."""

import json
import os
import tracemalloc

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from jaxlm.interop import hf as hf_interop  # noqa: E402
from jaxlm.interop.hf import export_hf, import_hf  # noqa: E402
from jaxlm.models.decoder import Decoder  # noqa: E402

TOL = 1e-4
SEQ = 12
TOKENS_SEED = 0


# ---- helpers shared with test_interop_stablelm.py ----------------------------------------------

def randomize(model, seed):
    """Every parameter random (norm scales around 1), so norms and biases are exercised too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_scale = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.2 * noise if is_scale else 0.2 * noise)
    return model


def save_random_hf(config, model_cls, path, seed=0):
    torch.manual_seed(seed)
    model = randomize(model_cls(config).eval(), seed)
    model.save_pretrained(path)
    return model


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32).eval()


def tokens(vocab, length=SEQ, batch=2):
    return np.random.default_rng(TOKENS_SEED).integers(0, vocab, (batch, length))


def hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.tensor(toks)).logits.numpy()


_APPLY = {}


def jax_logits(cfg, params, toks):
    if cfg not in _APPLY:
        _APPLY[cfg] = jax.jit(Decoder(cfg).apply)
    logits, _ = _APPLY[cfg]({"params": params}, toks)
    return np.asarray(logits)


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def roundtrip(src, tmp_path_factory, seq=SEQ):
    """HF dir -> import -> jaxlm logits; -> export -> HF logits and a second import."""
    cfg, params = import_hf(src)
    toks = tokens(cfg.vocab_size, seq)
    out = export_hf(cfg, params, str(tmp_path_factory.mktemp("export") / "model"))
    return {"dir": src, "cfg": cfg, "params": params, "ref": hf_logits(load_hf(src), toks),
            "ours": jax_logits(cfg, params, toks), "back": hf_logits(load_hf(out), toks),
            "again": import_hf(out)}


def same_params(a, b):
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def parity_cases(cases, model_cls=None, seq=SEQ):
    """`(build, case)` for a table {name: () -> HF config} of one family (model_cls), or
    {name: () -> (HF config, model class)}: `build(name, tmp_path_factory)` saves the case's
    random HF model and round-trips it once per test session; `case` is a module fixture over
    every name, which `ParityTests` runs on."""
    built = {}

    def build(name, tmp_path_factory):
        if name not in built:
            made = cases[name]()
            config, cls = made if model_cls is None else (made, model_cls)
            path = str(tmp_path_factory.mktemp(name) / "hf")
            save_random_hf(config, cls, path, seed=len(name))
            built[name] = {"name": name, **roundtrip(path, tmp_path_factory, seq=seq)}
        return built[name]

    @pytest.fixture(scope="module", params=sorted(cases))
    def case(request, tmp_path_factory):
        return build(request.param, tmp_path_factory)

    return build, case


class ParityTests:
    """The acceptance checks of every family, on each case of its `case` fixture: transformers
    -> import gives its logits; export loads in transformers with the same logits; importing
    the export gives the same config and bit-identical parameters."""

    def test_import_matches_transformers(self, case):
        assert max_diff(case["ours"], case["ref"]) <= TOL

    def test_export_loads_in_transformers_with_same_logits(self, case):
        assert max_diff(case["back"], case["ref"]) <= TOL

    def test_export_then_import_is_exact(self, case):
        cfg, params = case["again"]
        assert cfg == case["cfg"] and same_params(params, case["params"])


# ---- parity cases -------------------------------------------------------------------------------

def llama_config(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                max_position_embeddings=128, attn_implementation="eager")
    base.update(kw)
    return transformers.LlamaConfig(**base)


CASES = {
    # GQA 4:2, untied, linear position interpolation.
    "gqa_untied_linear": lambda: (llama_config(
        rope_scaling={"rope_type": "linear", "factor": 2.0}), transformers.LlamaForCausalLM),
    # tied embeddings, attention_bias (q, k, v and o) and mlp_bias, llama3 scaling with θ and the
    # original length chosen so that high-, medium- and low-frequency bands all occur.
    "tied_bias_llama3": lambda: (llama_config(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_hidden_layers=3,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
        transformers.LlamaForCausalLM),
    # multi-head (no GQA), YaRN with a non-trivial ramp.
    "mha_yarn": lambda: (llama_config(
        num_key_value_heads=4,
        rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                         "original_max_position_embeddings": 32}),
        transformers.LlamaForCausalLM),
    # Mistral: MQA, explicit head_dim != hidden/heads, a sliding window longer than the test.
    "mistral_mqa_headdim": lambda: (transformers.MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
        sliding_window=64, rms_norm_eps=1e-5, attn_implementation="eager"),
        transformers.MistralForCausalLM),
}


build, case = parity_cases(CASES)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The GQA / untied / linear-rope case, used by the file-format and error tests."""
    return build("gqa_untied_linear", tmp_path_factory)


class TestParity(ParityTests):
    """Import, export and a second import of every case."""


def test_imported_config_fields(case):
    cfg, name = case["cfg"], case["name"]
    expected = {
        "gqa_untied_linear": dict(kv_heads=2, tie_embeddings=False, scaling="linear"),
        "tied_bias_llama3": dict(kv_heads=2, tie_embeddings=True, scaling="llama3",
                                 qkv_bias=True, out_bias=True, mlp_bias=True),
        "mha_yarn": dict(kv_heads=4, tie_embeddings=False, scaling="yarn"),
        "mistral_mqa_headdim": dict(kv_heads=1, head_size=16, max_seq_len=64),
    }[name]
    got = {k: (cfg.rope.scaling if k == "scaling" else getattr(cfg, k)) for k in expected}
    assert got == expected
    if cfg.tie_embeddings:
        assert "lm_head" not in case["params"]


@pytest.fixture(scope="module")
def dynamic_dir(tmp_path_factory):
    config = llama_config(max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 100.0, "factor": 2.0})
    path = str(tmp_path_factory.mktemp("dynamic") / "hf")
    save_random_hf(config, transformers.LlamaForCausalLM, path, seed=5)
    return path


@pytest.mark.parametrize("seq", [12, 24])  # inside and beyond max_position_embeddings=16
def test_dynamic_ntk_fresh_model_per_length(dynamic_dir, seq, tmp_path_factory):
    # HF recomputes dynamic frequencies statefully, so every length gets freshly loaded models.
    r = roundtrip(dynamic_dir, tmp_path_factory, seq)
    cfg, ref = r["cfg"], r["ref"]
    assert r["again"][0] == cfg
    assert (cfg.rope.scaling, cfg.rope.original_max_position, cfg.max_seq_len) == ("dynamic", 16, 32)
    assert max_diff(r["ours"], ref) <= TOL
    assert max_diff(r["back"], ref) <= TOL


def test_mistral_window_shorter_than_the_context_caps_max_seq_len(tmp_path_factory):
    """jaxlm has no sliding window: a Mistral whose window (8) is shorter than its context gets
    max_seq_len = window, on which full causal attention and the window agree exactly; past it
    they differ (so refusing longer rows, as data.seq_len <= max_seq_len does, is needed)."""
    config = transformers.MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=8, rms_norm_eps=1e-5, attn_implementation="eager")
    path = str(tmp_path_factory.mktemp("window") / "hf")
    save_random_hf(config, transformers.MistralForCausalLM, path, seed=8)
    cfg, params = import_hf(path)
    assert (cfg.max_seq_len, cfg.rope.scaling) == (8, "none")
    model, toks = load_hf(path), tokens(cfg.vocab_size, 12)
    assert max_diff(jax_logits(cfg, params, toks[:, :8]), hf_logits(model, toks[:, :8])) <= TOL
    beyond = np.abs(jax_logits(cfg, params, toks) - hf_logits(model, toks)).max(axis=(0, 2))
    assert beyond[:8].max() <= TOL and beyond[8:].min() > 1e-3
    out = export_hf(cfg, params, str(tmp_path_factory.mktemp("window_out") / "model"))
    assert json.loads(open(os.path.join(out, "config.json")).read())[
        "max_position_embeddings"] == 8
    assert max_diff(hf_logits(load_hf(out), toks[:, :8]), hf_logits(model, toks[:, :8])) <= TOL


# ---- file formats -------------------------------------------------------------------------------

def test_sharded_checkpoints_read_and_write(base, tmp_path):
    model = load_hf(base["dir"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    _, params = import_hf(str(tmp_path / "sharded"))
    assert same_params(params, base["params"])
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    out = export_hf(base["cfg"], params, str(tmp_path / "ours"), max_shard_bytes=30_000,
                    extra_config={"eos_token_id": 7}, copy_files=[str(tmp_path / "tokenizer.json")])
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == 7
    assert open(os.path.join(out, "tokenizer.json")).read() == '{"model": {}}'
    toks = tokens(base["cfg"].vocab_size)
    assert max_diff(hf_logits(load_hf(out), toks), base["ref"]) <= TOL


def test_bfloat16_checkpoint_is_widened_exactly(base, tmp_path):
    model = load_hf(base["dir"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    _, params = import_hf(str(tmp_path / "bf16"))
    q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H·Dh, D]
    ours = params["blocks"]["slot_0"]["attention"]["q_proj"]["kernel"][1]  # [D, H, Dh]
    assert np.array_equal(ours.reshape(ours.shape[0], -1).T, q)
    emb = model.model.embed_tokens.weight.detach().float().numpy()
    assert np.array_equal(params["embed"]["embedding"], emb)


def test_import_peak_memory_is_close_to_parameter_bytes(tmp_path):
    """A ~46M-parameter float32 LLaMA: tracemalloc peak (NumPy reports its buffers to it)
    during import stays <= 1.3x the parameter bytes; export adds <= 0.3x on top."""
    d, layers, vocab, ffn, heads, kv = 512, 12, 8192, 1536, 8, 4
    hd = d // heads
    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    tensors = {"model.embed_tokens.weight": rand(vocab, d), "lm_head.weight": rand(vocab, d),
               "model.norm.weight": rand(d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": rand(d), p + "post_attention_layernorm.weight": rand(d),
            p + "self_attn.q_proj.weight": rand(heads * hd, d),
            p + "self_attn.k_proj.weight": rand(kv * hd, d),
            p + "self_attn.v_proj.weight": rand(kv * hd, d),
            p + "self_attn.o_proj.weight": rand(d, heads * hd),
            p + "mlp.gate_proj.weight": rand(ffn, d), p + "mlp.up_proj.weight": rand(ffn, d),
            p + "mlp.down_proj.weight": rand(d, ffn)})
    param_bytes = sum(t.nbytes for t in tensors.values())
    down_3 = tensors["model.layers.3.mlp.down_proj.weight"].copy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    del tensors
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": d,
                   "intermediate_size": ffn, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": kv,
                   "rms_norm_eps": 1e-5, "max_position_embeddings": 256}, f)
    hf_interop.param_shapes(hf_interop.config_from_hf(hf_interop.read_config(str(tmp_path))))
    tracemalloc.start()
    try:
        _, params = import_hf(str(tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert param_bytes > 180e6
    print(f"import peak {peak / param_bytes:.3f}x parameter bytes")
    assert peak <= 1.3 * param_bytes, (peak / param_bytes)
    assert np.array_equal(params["blocks"]["slot_0"]["mlp"]["down_proj"]["kernel"][3], down_3.T)
    # Export streams too: on top of the params it holds, one HF tensor at a time (no second
    # copy of the model). The config is re-read so param_shapes' tracing is not counted.
    cfg = hf_interop.config_from_hf(hf_interop.read_config(str(tmp_path)))
    hf_interop.param_shapes(cfg)
    tracemalloc.start()
    try:
        out = export_hf(cfg, params, str(tmp_path / "out"))
        _, extra = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"export peak {extra / param_bytes:.3f}x parameter bytes above the params")
    assert extra <= 0.3 * param_bytes, (extra / param_bytes)
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        assert np.array_equal(f.get_tensor("model.layers.3.mlp.down_proj.weight"), down_3)


# ---- bad input: one-line errors, nothing half-written -------------------------------------------

@pytest.fixture
def small_dir(base, tmp_path):
    load_hf(base["dir"]).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def rewrite(path, edit):
    with safe_open(str(path / "model.safetensors"), "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_unknown_architecture(small_dir):
    config = json.loads((small_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (small_dir / "config.json").write_text(json.dumps(config))
    one_line_error(lambda: import_hf(str(small_dir)), "GPT2LMHeadModel.*unknown architecture")


def test_missing_tensor(small_dir):
    rewrite(small_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    one_line_error(lambda: import_hf(str(small_dir)),
                   "missing tensor 'model.layers.1.mlp.up_proj.weight'")


def test_extra_tensor(small_dir):
    rewrite(small_dir, lambda t: t.update({"model.layers.0.self_attn.extra.weight":
                                           np.zeros(3, np.float32)}))
    one_line_error(lambda: import_hf(str(small_dir)),
                   "unexpected tensor 'model.layers.0.self_attn.extra.weight'")


def test_shape_mismatch(small_dir):
    rewrite(small_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                           np.zeros((8, 32), np.float32)}))
    one_line_error(lambda: import_hf(str(small_dir)),
                   r"'model.layers.0.self_attn.k_proj.weight' has shape \[8, 32\], "
                   r"expected \[16, 32\]")


def test_unsupported_rope_type(small_dir):
    config = json.loads((small_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    (small_dir / "config.json").write_text(json.dumps(config))
    one_line_error(lambda: import_hf(str(small_dir)), "rope_type='longrope'")


def test_export_refuses_to_overwrite(base, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    one_line_error(lambda: export_hf(base["cfg"], base["params"], str(tmp_path / "out")),
                   "already exists")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_export_failure_leaves_no_directory(base, tmp_path, monkeypatch):
    calls = []

    def failing(params, group, dtype):
        calls.append(1)
        if len(calls) == 5:
            raise ValueError("disk full (simulated)")
        return real(params, group, dtype)

    real = hf_interop._hf_value
    monkeypatch.setattr(hf_interop, "_hf_value", failing)
    with pytest.raises(ValueError, match="simulated"):
        export_hf(base["cfg"], base["params"], str(tmp_path / "out"))
    assert len(calls) == 5 and os.listdir(tmp_path) == []


def test_export_rejects_what_llama_cannot_express(base, tmp_path):
    import dataclasses
    cfg = dataclasses.replace(base["cfg"], qk_norm=True)
    one_line_error(lambda: export_hf(cfg, base["params"], str(tmp_path / "out")),
                   "model.qk_norm=True: LlamaForCausalLM can only express False")
    params = jax.tree.map(lambda x: x, base["params"])
    del params["final_norm"]
    one_line_error(lambda: export_hf(base["cfg"], params, str(tmp_path / "out")),
                   "params: missing final_norm/scale")
    assert not os.path.exists(tmp_path / "out")


def test_fused_rows_split_on_import_and_fuse_on_export(base, tmp_path, monkeypatch):
    """The table mechanism later families need (Granite's gate‖up `input_linear`, Mamba-2's
    `in_proj`): rows with part=(axis, start, stop) share one HF tensor."""
    import dataclasses

    from jaxlm.interop import llama as llama_table
    from jaxlm.interop import tables
    f, d = base["cfg"].mlp_dim, base["cfg"].embed_dim
    name = "model.layers.{layer}.mlp.gate_up_proj.weight"

    def layer_tensors(cfg, kind):
        rows = [r for r in llama_table.layer_tensors(cfg, kind)
                if r.path[:2] not in (("mlp", "gate_proj"), ("mlp", "up_proj"))]
        return rows + [
            tables.Tensor(name, ("mlp", "gate_proj", "kernel"), (2 * f, d), (1, 0), part=(0, 0, f)),
            tables.Tensor(name, ("mlp", "up_proj", "kernel"), (2 * f, d), (1, 0), part=(0, f, 2 * f))]

    fused = dataclasses.replace(
        llama_table.FAMILY, architectures=("FusedLlama",), export_architecture="FusedLlama",
        config_to_hf=lambda cfg: {**llama_table.config_to_hf(cfg), "architectures": ["FusedLlama"]},
        layer_tensors=layer_tensors)
    monkeypatch.setitem(hf_interop.FAMILIES, "llama", fused)
    out = export_hf(base["cfg"], base["params"], str(tmp_path / "fused"))
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as st:
        assert "model.layers.1.mlp.gate_proj.weight" not in st.keys()
        gate_up = st.get_tensor(name.format(layer=1))
    mlp = base["params"]["blocks"]["slot_0"]["mlp"]
    np.testing.assert_array_equal(gate_up, np.concatenate(
        [mlp["gate_proj"]["kernel"][1].T, mlp["up_proj"]["kernel"][1].T]))
    _, params = import_hf(out)
    assert same_params(params, base["params"])
