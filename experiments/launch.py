"""The single entry point.

    python experiments/launch.py --config experiments/configs/quickstart.py --workdir runs/qs
    python experiments/launch.py --config experiments/configs/llama.py:tiny --workdir runs/t \
        --config.train.steps=20 --config.model.num_layers=2
    python experiments/launch.py --mode generate --workdir runs/qs --prompt "def add(a, b):"

Each mode lives in its own module under experiments/modes/ (its flags and a `run(ctx)`):
train (default; resumes from the workdir's newest checkpoint), eval (held-out loss of the
newest checkpoint), generate (sample a continuation of --prompt or config.generate.prompt),
train_tokenizer (train config.data's byte-level BPE into data.tokenizer_path or its cache).
Without --config, modes other than train read the workdir's config.json.

Bad input (an unknown or mistyped config field, a missing data path, a workdir holding another
experiment) ends with one line `error: ...` on stderr and exit status 2, before anything is
compiled or written.

Multi-host: run the same command on every host with
    --coordinator host0:1234 --num_processes N --process_id i
or nothing extra under a launcher JAX detects (SLURM, Open MPI, TPU pods); each process loads its
own rows of every batch and only process 0 prints and writes logs.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from experiments.modes import MODES  # noqa: E402
from jaxlm import config as config_lib  # noqa: E402
from jaxlm.data.sources import SourceError  # noqa: E402
from jaxlm.schema import ConfigError, unknown_key_error  # noqa: E402

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file `path.py[:variant]`; fields overridable as --config.a.b=value",
    lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (config.json, checkpoints, metrics)")
flags.DEFINE_enum("mode", "train", sorted(MODES), "what to do")
flags.DEFINE_string("coordinator", None, "multi-host: 'host:port' of process 0's coordinator")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index in [0, N)")
flags.DEFINE_enum("distributed", "auto", ["auto", "off"], "auto: without --coordinator, start "
                  "multi-host when a cluster launcher (SLURM, Open MPI, TPU pod) is detected")

USER_ERRORS = (ConfigError, SourceError, ValueError, KeyError, FileNotFoundError)


def fail(message: str) -> None:
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.exit(2)


def parse_flags(argv: list[str]) -> None:
    try:
        FLAGS(argv)
    except flags.Error as e:
        fail(_explain_flag_error(e, argv))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        fail(_explain_flag_error(e, argv))
    if FLAGS.workdir is None and getattr(MODES[FLAGS.mode], "NEEDS_WORKDIR", True):
        fail(f"--workdir is required with --mode {FLAGS.mode}")


def _explain_flag_error(error: Exception, argv: list[str]) -> str:
    """ml_collections reports an unknown override key as a bare KeyError/AttributeError;
    name the flag and suggest the closest real field."""
    text = str(error)
    if "Traceback (most recent call last)" in text:  # the config file's get_config() raised
        flag = text.split(":", 1)[0]
        return f"{flag}: {text.strip().splitlines()[-1]}"
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        path = key.split(".")
        node = config_lib.default_config()
        for depth, part in enumerate(path):
            if part not in node:
                prefix = ".".join(path[:depth])
                known = list(node.keys()) if hasattr(node, "keys") else []
                return str(unknown_key_error(part, known, prefix + "." if prefix else ""))
            node = node[part]
    return text


def load_config():
    if _CONFIG.value is not None:
        error = getattr(_CONFIG.value, "_error", None)  # ml_collections defers load failures
        if error is not None:
            fail(f"--config: {error}")
        return config_lib.parse_config(_CONFIG.value)
    path = os.path.join(FLAGS.workdir, "config.json")
    if not os.path.exists(path):
        fail(f"no --config given and {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return config_lib.parse_config(json.load(f))


class Context:
    """What a mode's `run(ctx)` gets: the flags, the workdir, and the config on demand."""

    def __init__(self):
        self.flags = FLAGS
        self.workdir = FLAGS.workdir
        self.config_given = _CONFIG.value is not None
        self.fail = fail

    def config(self):
        return load_config()


def main(argv: list[str]) -> None:
    parse_flags(argv)
    try:
        from jaxlm.parallel import distributed  # before anything asks JAX for its devices
        distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                               auto=FLAGS.distributed == "auto")
        MODES[FLAGS.mode].run(Context())
    except USER_ERRORS as e:
        fail(e.args[0] if isinstance(e, KeyError) and e.args else e)


if __name__ == "__main__":
    main(sys.argv)
