"""--mode train_tokenizer: train config.data's byte-level BPE and write it to
data.tokenizer_path (or its cache path when that is empty). No --workdir needed."""

NEEDS_WORKDIR = False


def run(ctx) -> None:
    if not ctx.config_given:
        ctx.fail("--mode train_tokenizer needs --config")
    cfg = ctx.config()
    from jaxlm.data.tokenizers import bpe_cache_path, train_bpe
    train_bpe(cfg.data, cfg.data.bpe_vocab_size, cfg.data.tokenizer_path or bpe_cache_path(cfg.data))
