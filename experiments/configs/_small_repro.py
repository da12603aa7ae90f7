"""Shared by the repro_* configs (not a config itself): the small model and short run that
each reproduction trains, so that their figures compare across reproductions."""


def small_model(model, kv_heads=None):
    """D 64, 4 layers, 4 heads, SwiGLU width 176 (~2.75 × D, as LLaMA's 8/3 rounded)."""
    model.embed_dim = 64
    model.num_layers = 4
    model.num_heads = 4
    if kv_heads is not None:
        model.num_kv_heads = kv_heads
    model.mlp_dim = 176


def short_run(config, steps):
    """Seq 128 × batch 16 on the config's sources, peak LR 3e-3 after steps/10 of warmup, held-out
    loss every 50 steps on 8 batches, one checkpoint at the end, plain log lines."""
    config.data.seq_len = 128
    config.data.batch_size = 16
    config.train.steps = steps
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = steps // 10
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.eval_batches = 8
    config.train.checkpoint_every = steps
    config.train.progress_bar = False
