"""Settings declared once (training/settings.py): parser, presets and rules made from one declaration.

A small config declared here shows the machinery on its own; then the trainer's and the evaluation's
declarations: every field a flag with help in its group, the evaluation's bad values refused as the
trainer's are.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass

import pytest

from training import settings
from training.evaluation.config import EvalConfig
from training.evaluation.config import build_parser as eval_parser
from training.evaluation.config import parse_args as parse_eval
from training.loop.config import TrainConfig
from training.loop.config import build_parser as train_parser
from training.settings import at_least, derived, rule, setting, valid

SIZES = {"small": 8, "large": 64}


@dataclass(frozen=True)
class Toy:
    """Declared out of order on purpose: `half` reads `size`, declared after it."""

    kind: str = setting("what", "Which toy.", required=True, choices=sorted(SIZES))
    half: int = setting("what", "Half the size.", preset=lambda c: c.size // 2)
    size: int = setting(
        "what", "The size.", preset=lambda c: c.base_size, check=at_least(1, "{flag} must be at least 1.")
    )
    names: tuple[str, ...] = setting(
        "more", "Names.", preset=lambda c: (c.kind,), convert=lambda given: [n.upper() for n in given]
    )
    loud: bool = setting("more", "A switch.", default=False)
    shiny: bool = setting("more", "On unless --no-shiny.", preset=lambda c: c.kind == "large")
    ratio: float | None = setting(
        "more",
        "Below 1, and only with --loud.",
        check=(
            valid(lambda r: r < 1, "{flag} {value}: expected below 1."),
            rule(lambda c: c.ratio is None or c.loud, "--ratio needs --loud."),
        ),
    )
    extra: tuple[int, ...] | None = setting("more", "Optional numbers: None when not given.")
    count: int = derived(lambda c: len(c.names))

    @property
    def base_size(self) -> int:
        return SIZES[self.kind]


def toy_parser() -> argparse.ArgumentParser:
    return settings.build_parser(Toy, prog="toy", description="A toy.")


def parse_toy(*argv: str) -> Toy:
    return settings.parse(Toy, toy_parser(), list(argv))


def test_flags_take_their_type_group_and_kind_from_the_declaration():
    parser = toy_parser()
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    assert groups["what"] == ["kind", "half", "size"]
    assert groups["more"] == ["names", "loud", "shiny", "ratio", "extra"]
    actions = {a.dest: a for a in parser._actions}
    assert "count" not in actions  # derived: no flag
    assert actions["kind"].required and list(actions["kind"].choices) == ["large", "small"]
    assert actions["size"].type is int and actions["ratio"].type is float and actions["names"].nargs == "+"
    assert actions["extra"].type is int and actions["extra"].nargs == "+"
    assert isinstance(actions["loud"], argparse._StoreTrueAction)
    assert isinstance(actions["shiny"], argparse.BooleanOptionalAction)
    assert all(a.default is None for a in actions.values() if a.dest != "help")  # "not given" is None


def test_presets_fill_what_is_not_given_reading_other_settings_in_any_order():
    large = Toy(
        kind="large", half=32, size=64, names=("large",), loud=False, shiny=True, ratio=None, extra=None, count=1
    )
    assert parse_toy("--kind", "large") == large
    toy = parse_toy("--kind", "small", "--size", "10", "--names", "a", "b", "--no-shiny", "--loud")
    assert (toy.half, toy.size, toy.names, toy.shiny, toy.loud) == (5, 10, ("A", "B"), False, True)
    assert toy.count == 2 and parse_toy("--kind", "small", "--extra", "3", "1").extra == (3, 1)
    assert parse_toy("--kind", "small").names == ("small",)  # convert applies to a given value only


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "0"], "--size must be at least 1."),
        (["--ratio", "2", "--loud"], "--ratio 2.0: expected below 1."),
        (["--ratio", "0.5"], "--ratio needs --loud."),
    ],
)
def test_a_broken_rule_exits_with_status_2_and_its_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_toy("--kind", "small", *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: toy") and err.rstrip().endswith(f"toy: error: {message}")


def test_the_flags_the_user_gave_are_blamed_first():
    toy = dataclasses.replace(parse_toy("--kind", "small"), size=0, ratio=0.5)
    assert list(settings.problems(toy)) == ["--size must be at least 1.", "--ratio needs --loud."]
    blamed = list(settings.problems(toy, given=["ratio"]))
    assert blamed == ["--ratio needs --loud.", "--size must be at least 1."]


def test_presets_that_read_each_other_are_a_programming_error():
    @dataclass(frozen=True)
    class Loop:
        a: int = setting("g", "A.", preset=lambda c: c.b)
        b: int = setting("g", "B.", preset=lambda c: c.a)

    with pytest.raises(RuntimeError, match=r"the presets of \['a', 'b'\] read each other"):
        settings.resolve(Loop, argparse.Namespace(a=None, b=None))

    @dataclass(frozen=True)
    class Plain:
        a: int = dataclasses.field(default=0)

    with pytest.raises(TypeError, match="Plain.a is not declared with setting"):
        settings.declared(Plain)


TRAIN_GROUPS = ["domain and data", "models", "optimization", "checkpoints and monitoring"]
EVAL_GROUPS = [
    "what to evaluate",
    "models (default: the standard files in ComfyUI/models)",
    "metrics (local files only; nothing is downloaded)",
    "sampling",
    "two subjects (two people in one image: how much identity leaks between them)",
]


@pytest.mark.parametrize(
    "cls, parser, groups", [(TrainConfig, train_parser, TRAIN_GROUPS), (EvalConfig, eval_parser, EVAL_GROUPS)]
)
def test_every_field_is_one_flag_with_help_shown_in_its_group(cls, parser, groups):
    parser = parser()
    shown = [g for g in parser._action_groups if g.title in groups]
    assert [g.title for g in shown] == groups  # in this order in --help
    flags = [a.dest for g in shown for a in g._group_actions]
    fields = [f.name for f in dataclasses.fields(cls)]
    assert flags == [name for name in fields if name != "num_processes"]  # declaration order, each once
    assert all(len(a.help) > 10 for g in shown for a in g._group_actions)
    text = parser.format_help()
    positions = [text.index(f"\n{title}:\n") for title in groups]
    assert positions == sorted(positions)
    for name in flags:
        assert len(re.findall(rf"\n  --{name}(?=[ ,\n])", text)) == 1, name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--domain", "faces"], "--domain faces needs --encoder"),
        (["--domain", "tiny", "--encoder", "/none.safetensors"], "--encoder /none.safetensors: no such file"),
        (["--domain", "tiny", "--resolution", "100"], "--resolution 100: expected a positive multiple of 8."),
        (["--domain", "tiny", "--resolution", "0"], "--resolution 0: expected a positive multiple of 8."),
        (["--domain", "tiny", "--steps", "0"], "--steps 0: expected at least 1 step."),
        (["--domain", "tiny", "--open_clip_checkpoint", "w.safetensors"], "go together"),
        (["--domain", "tiny", "--identity", "dlib"], "--identity dlib needs real faces"),
    ],
)
def test_evaluation_rejects_bad_values_and_combinations_right_after_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_eval([*argv, "--output_dir", "out"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_evaluation_defaults_follow_the_domain(tmp_path):
    tiny = parse_eval(["--domain", "tiny", "--output_dir", "out"])
    assert (tiny.steps, tiny.resolution, tiny.seeds) == (4, 64, (0,))
    (tmp_path / "e.safetensors").write_bytes(b"")
    encoder = str(tmp_path / "e.safetensors")
    faces = parse_eval(["--domain", "faces", "--output_dir", "o", "--encoder", encoder])
    assert (faces.steps, faces.resolution, faces.seeds) == (30, 1024, (0, 1, 2, 3))
    assert tiny.methods == ("prior", "nested", "decoupled") and tiny.lambdas == (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
    flags = parse_eval(["--domain", "tiny", "--output_dir", "out", "--steps", "7", "--seeds", "3", "5"])
    assert (flags.steps, flags.seeds) == (7, (3, 5))
