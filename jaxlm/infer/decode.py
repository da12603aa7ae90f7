"""Cached, batched generation: prefill + every new token in one jitted program.

    gen = Generator(model, variables)                      # optionally mesh=..., rules=...
    new_ids = gen([[1, 2, 3], [4, 5]], max_new_tokens=32, stop_ids=[eot])   # list[list[int]]

One call is one XLA program: the prompts (left-padded to a common width, padding marked by
segment id 0, each row with its own positions) fill a preallocated cache in one forward pass,
then a `lax.while_loop` runs one-token steps until every row has produced a stop token or
`max_new_tokens`. Nothing returns to Python per token: on a CPU the per-step dispatch of a
Python loop would cost as much as a small model's step.

Stopping is per row: a row that produced one of its stop ids (kept in the output) takes no
further tokens (its later steps still run, masked, while other rows continue). `stop_ids` is
either one list for every row or one list per row.

Sampling follows `sample_token` (greedy at temperature 0; top-k, top-p) with the key
`jax.random.key(seed)` split once per new token, as `generate_uncached` does, so a one-row
call reproduces the uncached reference for the same seed.

Programs are cached per (max_new_tokens, sampling, cache length) and compiled per shape;
prompt widths are rounded up to a multiple of `prompt_bucket` so batches of similar lengths
share a compilation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.infer.cache import constrain_cache, init_cache
from jaxlm.infer.sampling import sample_token
from jaxlm.models.decoder import transpose_for_decoding, unstack_layers

NO_TOKEN = -1  # output fill after a row has stopped, and stop-list padding


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    vocab_limit: int = 0  # only ids below it are drawn (0: all; e.g. a tokenizer's vocabulary)

    def validate(self, vocab_size: int) -> None:
        if not 0 <= self.vocab_limit <= vocab_size:
            raise ValueError(f"vocab_limit={self.vocab_limit}: expected 0 (all) .. "
                             f"model.vocab_size={vocab_size}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature}: expected >= 0 (0: greedy)")
        if not 0 <= self.top_k <= vocab_size:
            raise ValueError(f"top_k={self.top_k}: expected 0 (all) .. model.vocab_size="
                             f"{vocab_size}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: expected a value in (0, 1]")


def decode_program(model, max_new_tokens: int, sampling: Sampling, cache_len: int,
                   per_repeat: bool = False):
    """fn(variables, tokens [b, p] left-padded, lengths [b], stop [b, n_stop], rng) ->
    new tokens [b, max_new_tokens] int32, NO_TOKEN after a row's stop token. `per_repeat`:
    the variables are in the decoding layout (`unstack_layers`, then `transpose_for_decoding`)."""
    cfg = model.cfg
    n = max_new_tokens

    def sample(logits_bv, rng):
        if sampling.vocab_limit:
            logits_bv = jnp.where(jnp.arange(logits_bv.shape[-1]) < sampling.vocab_limit,
                                  logits_bv, -jnp.inf)
        return sample_token(logits_bv, rng, sampling.temperature, sampling.top_k, sampling.top_p)

    def program(variables, tokens_bp, lengths_b, stop_bs, rng):
        b, p = tokens_bp.shape
        pad_b = p - lengths_b
        column_p = jnp.arange(p)
        segment_ids_bp = (column_p[None] >= pad_b[:, None]).astype(jnp.int32)
        positions_bp = jnp.maximum(column_p[None] - pad_b[:, None], 0)

        def is_stop(token_b):
            return jnp.any(token_b[:, None] == stop_bs, axis=-1)

        cache = constrain_cache(init_cache(cfg, b, cache_len, per_repeat=per_repeat), cfg)
        logits_bpv, aux = model.apply(variables, tokens_bp, positions_bp, segment_ids_bp,
                                      cache=cache)
        rng, step_rng = jax.random.split(rng)
        token_b = sample(logits_bpv[:, -1], step_rng)
        out_bn = jnp.full((b, n), NO_TOKEN, jnp.int32).at[:, 0].set(token_b)

        def keep_going(state):
            step, _, _, done_b, _, _ = state
            return (step < n) & ~jnp.all(done_b)

        def one_token(state):
            step, token_b, cache, done_b, out_bn, rng = state
            positions_b1 = (lengths_b + step - 1)[:, None]
            logits_b1v, aux = model.apply(variables, token_b[:, None], positions_b1, None,
                                          cache=cache)
            rng, step_rng = jax.random.split(rng)
            token_b = sample(logits_b1v[:, 0], step_rng)
            emitted_b = jnp.where(done_b, NO_TOKEN, token_b)
            out_bn = jax.lax.dynamic_update_slice(out_bn, emitted_b[:, None], (0, step))
            return (step + 1, token_b, constrain_cache(aux["cache"], cfg),
                    done_b | is_stop(token_b), out_bn, rng)

        state = (jnp.ones((), jnp.int32), token_b, constrain_cache(aux["cache"], cfg),
                 is_stop(token_b), out_bn, rng)
        return jax.lax.while_loop(keep_going, one_token, state)[4]

    return program


def variable_shardings(model, variables: dict, mesh: Mesh, rules,
                       per_repeat: bool = False) -> dict:
    """NamedShardings of `variables` from the logical names `init` gives them (the rules
    table's layout, no ZeRO: for inference every data replica holds the whole weights)."""
    length = min(model.cfg.max_seq_len, 8)
    abstract = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, length), jnp.int32)))
    specs = nn.get_partition_spec(abstract)
    specs = {name: specs[name] for name in variables}
    if per_repeat:  # every repeat takes the stacked leaves' names minus the leading `layers`
        for name, tree in list(specs.items()):
            tree = dict(tree)
            blocks = tree.pop("blocks", None)
            if blocks is not None:
                one = jax.tree.map(lambda spec: P(*spec[1:]), blocks,
                                   is_leaf=lambda x: isinstance(x, P))
                tree.update({f"blocks_{r}": one for r in range(model.cfg.num_repeats)})
            specs[name] = tree
        specs = transpose_for_decoding(specs, lambda spec, axes: P(*(spec[i] for i in axes)))
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


class Generator:
    """Cached generation for one model and its weights (see the module docstring)."""

    def __init__(self, model, variables: dict, *, mesh: Optional[Mesh] = None, rules=None,
                 prompt_bucket: int = 64, per_repeat: bool = True,
                 compiler_options: Optional[dict] = None):
        """per_repeat: keep one weight tree per repeat of the layer pattern (see
        `unstack_layers`) with the projections' kernels stored [out, in] (see
        `transpose_for_decoding`): faster steps on XLA:CPU, compile time growing with depth.
        False keeps the stacked weights as trained and the scanned layer stack.
        compiler_options: passed to `jax.jit` (tests use {'xla_backend_optimization_level': 0}
        for faster compiles)."""
        if prompt_bucket < 1:
            raise ValueError(f"prompt_bucket={prompt_bucket}: expected >= 1")
        self.model = model
        self.cfg = model.cfg
        self.mesh = mesh
        self.prompt_bucket = prompt_bucket
        self.per_repeat = per_repeat
        self.compiler_options = dict(compiler_options or {}) or None
        variables = nn.unbox(dict(variables))
        if per_repeat:
            variables = transpose_for_decoding(unstack_layers(variables, self.cfg))
        if mesh is not None:
            from jaxlm.parallel.rules import DEFAULT_RULES
            self.rules = tuple(rules) if rules is not None else DEFAULT_RULES
            self._variable_shardings = variable_shardings(model, variables, mesh, self.rules,
                                                          per_repeat)
            variables = jax.device_put(variables, self._variable_shardings)
            self._batch = NamedSharding(mesh, P(("data", "expert")))
            self._replicated = NamedSharding(mesh, P())
            self.batch_multiple = mesh.shape["data"] * mesh.shape["expert"]
        else:
            self.rules = None
            self.batch_multiple = 1
        self.variables = variables
        self._programs: dict = {}

    # ---- checks -------------------------------------------------------------------------------
    def _check_prompts(self, prompts) -> list[np.ndarray]:
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise ValueError("generate: prompts: expected a non-empty list of token-id lists")
        out = []
        vocab = self.cfg.vocab_size
        for i, prompt in enumerate(prompts):
            ids = np.asarray(prompt)
            if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"generate: prompt {i}: expected a non-empty list of token ids")
            if ids.min() < 0 or ids.max() >= vocab:
                bad = int(ids.max() if ids.max() >= vocab else ids.min())
                raise ValueError(f"generate: prompt {i}: token id {bad} outside "
                                 f"[0, model.vocab_size={vocab})")
            out.append(ids.astype(np.int32))
        return out

    def _stop_array(self, stop_ids, rows: int) -> np.ndarray:
        """[rows, n] int32 padded with NO_TOKEN; stop_ids: ids for all rows, or one list per row."""
        stop_ids = list(stop_ids)
        per_row = bool(stop_ids) and all(isinstance(s, (list, tuple, np.ndarray)) for s in stop_ids)
        if per_row and len(stop_ids) != rows:
            raise ValueError(f"generate: stop_ids has {len(stop_ids)} per-row lists for {rows} "
                             "prompts: expected one list per prompt (or one list for all)")
        lists = [list(s) for s in stop_ids] if per_row else [stop_ids] * rows
        vocab = self.cfg.vocab_size
        for row in lists:
            for s in row:
                if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) \
                        or not 0 <= s < vocab:
                    raise ValueError(f"generate: unknown stop token {s!r}: expected a token id "
                                     f"in [0, model.vocab_size={vocab})")
        width = max(1, max(len(r) for r in lists))
        out = np.full((rows, width), NO_TOKEN, np.int32)
        for i, row in enumerate(lists):
            out[i, :len(row)] = row
        return out

    def _program(self, max_new_tokens: int, sampling: Sampling, cache_len: int):
        key = (max_new_tokens, sampling, cache_len)
        if key not in self._programs:
            fn = decode_program(self.model, max_new_tokens, sampling, cache_len,
                                self.per_repeat)
            options = {"compiler_options": self.compiler_options}
            if self.mesh is None:
                self._programs[key] = jax.jit(fn, **options)
            else:
                b, r = self._batch, self._replicated
                self._programs[key] = jax.jit(
                    fn, in_shardings=(self._variable_shardings, b, b, b, r), out_shardings=b,
                    **options)
        return self._programs[key]

    def _tracing_context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        from jaxlm.parallel.sharding import activation_sharding
        return activation_sharding(self.mesh, self.rules)

    # ---- generation ---------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_ids=(), cache_len: Optional[int] = None,
                 vocab_limit: int = 0) -> list[list[int]]:
        """New token ids per prompt (each ends with its stop token if it produced one).

        cache_len: the attention cache's positions (default: the padded prompt width plus
        max_new_tokens); a prompt that does not fit with its new tokens is an error.
        vocab_limit: draw only ids below it (e.g. the tokenizer's vocabulary when the model's
        is padded larger; 0: all).
        """
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens!r}: expected an int >= 1")
        sampling = Sampling(float(temperature), int(top_k), float(top_p), int(vocab_limit))
        sampling.validate(self.cfg.vocab_size)
        ids = self._check_prompts(prompts)
        stop = self._stop_array(stop_ids, len(ids))
        longest = max(len(x) for x in ids)
        needed = longest + max_new_tokens
        if needed > self.cfg.max_seq_len:
            raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens="
                             f"{max_new_tokens} = {needed} positions: more than "
                             f"model.max_seq_len={self.cfg.max_seq_len}")
        if cache_len is not None and needed > cache_len:
            raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens="
                             f"{max_new_tokens} = {needed} positions: longer than the cache "
                             f"(cache_len={cache_len})")
        width = -(-longest // self.prompt_bucket) * self.prompt_bucket
        if cache_len is None:
            cache_len = min(width, self.cfg.max_seq_len - max_new_tokens) + max_new_tokens
        width = min(width, cache_len - max_new_tokens)

        rows = -(-len(ids) // self.batch_multiple) * self.batch_multiple
        tokens = np.zeros((rows, width), np.int32)
        lengths = np.ones((rows,), np.int32)  # filler rows: one token 0, never read back
        for i, x in enumerate(ids):
            tokens[i, width - len(x):] = x
            lengths[i] = len(x)
        stop = np.concatenate([stop, np.full((rows - len(ids), stop.shape[1]), NO_TOKEN,
                                             np.int32)])
        program = self._program(int(max_new_tokens), sampling, int(cache_len))
        with self._tracing_context():
            out = program(self.variables, tokens, lengths, stop, jax.random.key(seed))
        out = np.asarray(jax.device_get(out))
        results = []
        for row in out[:len(ids)]:
            stop_at = np.flatnonzero(row == NO_TOKEN)
            results.append(row[:stop_at[0] if stop_at.size else len(row)].tolist())
        return results


def generate(model, variables: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             **kwargs) -> list[list[int]]:
    """One-off `Generator(model, variables)(prompts, max_new_tokens, **kwargs)`."""
    return Generator(model, variables)(prompts, max_new_tokens, **kwargs)
