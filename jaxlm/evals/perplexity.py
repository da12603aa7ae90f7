"""Held-out perplexity and bits per byte.

    result = perplexity(model, variables, batches, tokenizer)
    # {'perplexity', 'nats_per_token', 'bits_per_byte', 'tokens', 'bytes'}

`batches` are the training pipeline's held-out batches ({'inputs', 'targets', 'loss_mask'} and,
with document masking, 'positions' / 'segment_ids'). Over every target with loss_mask 1:

    nats_per_token = Σ -log p(target) / tokens          perplexity = exp(nats_per_token)
    bits_per_byte  = Σ -log p(target) / (ln 2 · bytes)

where bytes = Σ tokenizer.bytes_per_token(target): the UTF-8 bytes of text the targets stand
for. Special tokens (the <|endoftext|> that ends each document) stand for no text, so their
nats are charged to the document's bytes, which is what makes bits per byte comparable across
tokenizers: every tokenizer pays for the same text and the same document ends.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnums=0)
def _target_nats(model, variables, batch):
    """-log p(target) per position [b, t], float32."""
    logits_btv, _ = model.apply(variables, batch["inputs"], batch.get("positions"),
                                batch.get("segment_ids"))
    log_probs = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]


def perplexity(model, variables: dict, batches: Iterable[dict], tokenizer, *,
               put=None, get=None, tracing_context=None) -> dict:
    """Perplexity and bits per byte of `model` on `batches` (see the module docstring).

    put: places a host batch on devices (e.g. with the mesh's batch sharding; default:
    as is); get: brings the per-token results back to the host (default jax.device_get; a
    multi-process run passes `jaxlm.parallel.distributed.to_host`, since no process can read
    the others' devices); tracing_context: a context manager factory for the logical-axis
    rules.
    """
    nats, tokens, text_bytes = 0.0, 0.0, 0.0
    for batch in batches:
        keys = ("inputs", "targets", "positions", "segment_ids")
        device_batch = {k: np.asarray(batch[k], np.int32) for k in keys if k in batch}
        mask = np.asarray(batch["loss_mask"], np.float64)
        if put is not None:
            device_batch = put(device_batch)
        if tracing_context is not None:
            with tracing_context():
                per_token = _target_nats(model, variables, device_batch)
        else:
            per_token = _target_nats(model, variables, device_batch)
        per_token = np.asarray((get or jax.device_get)(per_token), np.float64)
        nats += float((per_token * mask).sum())
        tokens += float(mask.sum())
        text_bytes += float((tokenizer.bytes_per_token(np.asarray(batch["targets"])) * mask).sum())
    if tokens == 0:
        raise ValueError("perplexity: the batches hold no target tokens (loss_mask all 0); "
                         "expected at least one")
    if text_bytes == 0:
        raise ValueError("perplexity: the targets stand for no text bytes; expected text")
    nats_per_token = nats / tokens
    return {"perplexity": math.exp(nats_per_token), "nats_per_token": nats_per_token,
            "bits_per_byte": nats / (math.log(2) * text_bytes),
            "tokens": int(tokens), "bytes": int(text_bytes)}


def text_perplexity(model, variables: dict, texts: Iterable[str], tokenizer, seq_len: int,
                    eot_id: Optional[int] = None) -> dict:
    """Perplexity / bits per byte of plain texts, each scored on its own: the sequence is
    [<|endoftext|>] + tokens (the leading end-of-text as the context of the first token),
    cut into windows of `seq_len` predictions that each see only their own window."""
    from jaxlm.data.tokenizers import EOT
    eot = tokenizer.special_id(EOT) if eot_id is None else eot_id
    batches = []
    for text in texts:
        ids = np.concatenate([[eot], tokenizer.encode(text)]).astype(np.int32)
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start:start + seq_len + 1]
            n = len(window) - 1
            inputs = np.zeros((1, seq_len), np.int32)
            targets = np.zeros((1, seq_len), np.int32)
            mask = np.zeros((1, seq_len), np.float32)
            inputs[0, :n], targets[0, :n], mask[0, :n] = window[:-1], window[1:], 1.0
            batches.append({"inputs": inputs, "targets": targets, "loss_mask": mask})
    return perplexity(model, variables, batches, tokenizer)
