"""Every field of the experiment config is checked for type and range, in one line naming it."""

import dataclasses
import math
import typing

import pytest

from jaxlm.config import Config, default_config, describe_config, parse_config
from jaxlm.schema import ConfigError, _optional_inner


def leaf_fields(cls=Config, prefix=""):
    """(dotted name, field, annotation) of every non-section field, recursively."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_fields(type(value), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, hints[f.name]


FIELDS = list(leaf_fields())


def nested(dotted: str, value) -> dict:
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def one_line_error(dotted: str, value) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(nested(dotted, value))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_field_has_a_default_and_help():
    rows = describe_config()
    assert len(rows) == len(FIELDS) > 50
    assert all(help_text.strip() for _, _, help_text in rows)
    parse_config(default_config())  # the defaults themselves are valid


@pytest.mark.parametrize("dotted", [name for name, _, tp in FIELDS if tp is not typing.Any])
def test_a_wrong_type_names_the_field_and_what_was_expected(dotted):
    message = one_line_error(dotted, {"not": "a value"})
    assert message.startswith(f"{dotted}={{'not': 'a value'}}: expected "), message


RANGED = [(name, f.metadata) for name, f, _ in FIELDS
          if f.metadata.get("min") is not None or f.metadata.get("max") is not None]
CHOICES = [(name, f.metadata["choices"]) for name, f, _ in FIELDS if f.metadata.get("choices")]


@pytest.mark.parametrize("dotted,meta", RANGED, ids=[name for name, _ in RANGED])
def test_values_out_of_range_name_the_bound(dotted, meta):
    _, f, tp = next(row for row in FIELDS if row[0] == dotted)
    base = _optional_inner(tp) or tp
    step = 1 if base is int else 0.5
    if meta.get("min") is not None:
        low = meta["min"] if meta.get("min_exclusive") else meta["min"] - step
        op = ">" if meta.get("min_exclusive") else ">="
        assert one_line_error(dotted, base(low)) == f"{dotted}={base(low)!r}: expected {op} " \
                                                   f"{meta['min']}"
    if meta.get("max") is not None:
        high = base(meta["max"] + step)
        assert one_line_error(dotted, high) == f"{dotted}={high!r}: expected <= {meta['max']}"


@pytest.mark.parametrize("dotted,choices", CHOICES, ids=[name for name, _ in CHOICES])
def test_values_outside_the_choices_list_them(dotted, choices):
    wrong = "no-such-choice" if isinstance(choices[0], str) else 12345
    assert one_line_error(dotted, wrong) == f"{dotted}={wrong!r}: expected one of {list(choices)}"


@pytest.mark.parametrize("dotted", [name for name, _, tp in FIELDS
                                    if (_optional_inner(tp) or tp) is float])
def test_float_fields_reject_nan_and_unexpected_infinity(dotted):
    assert one_line_error(dotted, math.nan) == f"{dotted}=nan: expected a number"
    default = next(f for name, f, _ in FIELDS if name == dotted).default
    if not (isinstance(default, float) and math.isinf(default)):
        message = one_line_error(dotted, math.inf)
        assert message.startswith(f"{dotted}=inf: expected "), message


@pytest.mark.parametrize("dotted,suggestion", [
    ("train.learning_rat", "train.learning_rate"), ("model.rope.thetta", "model.rope.theta"),
    ("trian", "train"), ("data.batchsize", "data.batch_size")])
def test_unknown_fields_are_rejected_with_did_you_mean(dotted, suggestion):
    assert one_line_error(dotted, 1).endswith(f"did you mean '{suggestion}'?")


def test_ints_and_bools_are_not_confused():
    assert one_line_error("train.steps", True) == "train.steps=True: expected an int"
    assert one_line_error("train.progress_bar", 1) == ("train.progress_bar=1: expected a bool "
                                                       "(True/False)")
    assert one_line_error("train.steps", 2.5) == "train.steps=2.5: expected an int"
    assert parse_config(nested("train.steps", 700.0)).train.steps == 700
