"""--mode convert: a Hugging Face model directory <-> a run directory.

    launch.py --mode convert --hf_dir path/to/hf_model --workdir runs/new [--config recipe.py]
    launch.py --mode convert --workdir runs/trained --hf_out path/to/hf_out

HF -> run: the model section comes from the HF config.json (jaxlm.interop.hf), every other
section from --config if given, else the defaults (data.seq_len capped at the model's
max_seq_len); the new run directory holds a step-0 checkpoint with a fresh optimizer and data
stream, ready for `--mode train`. Without --config, an HF tokenizer.json that has the
`<|endoftext|>` token the data pipeline separates documents with is copied into the run and used
(data.tokenizer='file'); otherwise the default tokenizer stays and a note says so.

run -> HF: the newest checkpoint's parameters are written as config.json + safetensors that
`transformers` loads (plus the run's tokenizer.json, if it uses one by that name). Neither
direction touches its input, and a failure leaves no half-written output.
"""

from __future__ import annotations

import json
import os

from absl import flags

flags.DEFINE_string("hf_dir", None, "convert: Hugging Face model directory to import into a new "
                    "run (--workdir)")
flags.DEFINE_string("hf_out", None, "convert: new directory to export the run in --workdir to")

TOKENIZER_FILE = "tokenizer.json"


def _adopt_tokenizer(cfg, hf_dir: str, workdir: str):
    """(cfg, files to copy): use the HF tokenizer.json if the data pipeline can."""
    from jaxlm.data.tokenizers import EOT, HFTokenizer
    from jaxlm.schema import replace
    path = os.path.join(hf_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        return cfg, []
    try:
        tokenizer = HFTokenizer(path, required=(EOT,))
    except Exception as e:  # noqa: BLE001 — any reason it cannot serve the pipeline
        print(f"note: {path} not used for training ({' '.join(str(e).split())[:200]}); the run "
              f"keeps data.tokenizer={cfg.data.tokenizer!r}")
        return cfg, []
    if tokenizer.vocab_size > cfg.model.vocab_size:
        print(f"note: {path} has {tokenizer.vocab_size} tokens > model.vocab_size="
              f"{cfg.model.vocab_size}; the run keeps data.tokenizer={cfg.data.tokenizer!r}")
        return cfg, []
    data = replace(cfg.data, tokenizer="file",
                   tokenizer_path=os.path.join(os.path.abspath(workdir), TOKENIZER_FILE))
    return replace(cfg, data=data), [path]


def import_to_run(ctx) -> None:
    from jaxlm.config import default_config, parse_config
    from jaxlm.interop.hf import import_hf, read_config
    from jaxlm.schema import replace
    from jaxlm.surgery import rundir
    workdir = rundir.check_new_workdir(ctx.workdir)
    base = ctx.config() if ctx.config_given else parse_config(default_config())
    model, params = import_hf(ctx.flags.hf_dir)
    window = read_config(ctx.flags.hf_dir).get("sliding_window")
    if window is not None and model.max_seq_len == int(window):
        print(f"note: jaxlm has no sliding-window attention; model.max_seq_len={window} (the "
              "sliding_window), on which full attention and the window agree exactly")
    if not ctx.config_given and base.data.seq_len > model.max_seq_len:
        # the default row length does not fit this model (e.g. a Mistral whose sliding window
        # caps max_seq_len): rows as long as the model allows; a --config's seq_len is the
        # user's and is checked as given
        base = replace(base, data=replace(base.data, seq_len=model.max_seq_len))
    cfg = rundir.with_model(base, model)
    copy_files = []
    if not ctx.config_given:
        cfg, copy_files = _adopt_tokenizer(cfg, ctx.flags.hf_dir, workdir)
    origin = {"mode": "convert", "hf_dir": os.path.abspath(ctx.flags.hf_dir)}
    path = rundir.write_run(workdir, cfg, params, origin=origin, copy_files=copy_files)
    count = sum(int(p.size) for p in _leaves(params))
    print(json.dumps({"workdir": path, "family": model.family, "params": count,
                      "tokenizer": cfg.data.tokenizer}))


def export_run(ctx) -> None:
    from jaxlm.interop.hf import export_hf
    from jaxlm.surgery import rundir
    out = os.path.abspath(ctx.flags.hf_out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--hf_out {out}: already exists and is not empty; export never "
                         "overwrites")
    run = rundir.read_run(ctx.workdir)
    tokenizer = run.cfg.data.tokenizer_path
    copy_files = ([tokenizer] if run.cfg.data.tokenizer == "file" and os.path.isfile(tokenizer)
                  and os.path.basename(tokenizer) == TOKENIZER_FILE else [])
    export_hf(run.cfg.model, run.params, out, copy_files=copy_files)
    print(json.dumps({"hf_out": out, "step": run.step, "family": run.cfg.model.family,
                      "tokenizer": bool(copy_files)}))


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def run(ctx) -> None:
    f = ctx.flags
    if bool(f.hf_dir) == bool(f.hf_out):
        ctx.fail("--mode convert needs exactly one of --hf_dir (HF model -> new run in "
                 "--workdir) or --hf_out (run in --workdir -> new HF model directory)")
    if f.hf_dir:
        import_to_run(ctx)
    else:
        export_run(ctx)
