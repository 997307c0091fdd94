"""Settings declared once: each field of a frozen config dataclass carries its own flag.

The trainer's `TrainConfig` (training/config.py) and the evaluation's `EvalConfig`
(training/evaluation/config.py) declare every field with `setting(...)`: the group and help text `--help`
shows, the default, the value a domain preset gives it when the flag is not given, and its validity
rules. The field's type annotation is the flag's type: `int`, `float`, `str`; `bool` is a switch
(`--x`), or an on/off pair (`--x` / `--no-x`) where a preset or a default of True decides; `tuple[X, ...]`
takes one or more values (an empty tuple when none is given, or None if the annotation allows it). Everything else is made from that one declaration:

- `build_parser`: the argparse parser, groups and flags in declaration order;
- `resolve`: each setting not given filled from its `preset` (a function of the config being resolved:
  it may read other settings, which are resolved first, and the config class's properties) or default;
- `problems`: the rules each setting breaks, the settings the user gave first, then declaration order;
- `parse`: the three together; the first broken rule exits with argparse's status 2 and its message.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

SETTING = "setting"  # the key of a field's metadata that holds its Setting
C = TypeVar("C")
Message = str | Callable[[Any], str]


@dataclass(frozen=True)
class Rule:
    """A validity rule of one setting: `test` of its value (skipped while the value is None: an optional
    setting left unset) or, with `of_config`, of the whole config (rules over several settings).

    `message` says what is wrong and what to do: a `str.format` template with {flag} and {value} (the
    setting the rule is declared on; a literal brace is doubled, `{{token}}`), or a function of the config.
    """

    test: Callable[[Any], bool]
    message: Message
    of_config: bool = False

    def broken(self, name: str, config: Any) -> str | None:
        """The message when `config` breaks the rule, else None."""
        value = getattr(config, name)
        if self.of_config:
            if self.test(config):
                return None
        elif value is None or self.test(value):
            return None
        if callable(self.message):
            return self.message(config)
        return self.message.format(flag=f"--{name}", value=value)


def valid(test: Callable[[Any], bool], message: Message) -> Rule:
    """A rule on the setting's own value."""
    return Rule(test, message)


def rule(test: Callable[[Any], bool], message: Message) -> Rule:
    """A rule over several settings: `test` gets the resolved config."""
    return Rule(test, message, of_config=True)


def at_least(low: float, message: str = "{flag} must be at least {low}, got {value}.") -> Rule:
    """The value is `low` or more."""
    return Rule(lambda v: v >= low, message.replace("{low}", str(low)))


def positive(message: str = "{flag} must be positive, got {value}.") -> Rule:
    """The value is above 0 (a NaN is not)."""
    return Rule(lambda v: v > 0, message)


@dataclass(frozen=True)
class Setting:
    """One setting's declaration (the metadata of its dataclass field); see `setting`."""

    group: str | None
    help: str | None
    default: Any = None
    preset: Callable[[Any], Any] | None = None
    choices: Sequence[Any] | None = None
    required: bool = False
    rules: tuple[Rule, ...] = ()
    convert: Callable[[Any], Any] | None = None
    nargs: int | str | None = None
    metavar: str | tuple[str, ...] | None = None
    flag: bool = True


def setting(
    group: str,
    help: str,
    *,
    default: Any = None,
    preset: Callable[[Any], Any] | None = None,
    choices: Sequence[Any] | None = None,
    required: bool = False,
    check: Rule | tuple[Rule, ...] = (),
    convert: Callable[[Any], Any] | None = None,
    nargs: int | str | None = None,
    metavar: str | tuple[str, ...] | None = None,
) -> Any:
    """A config field that is also a flag, `--<field name>`.

    group, help: where and how `--help` shows it. default: its value when neither the flag nor `preset`
    gives one. preset: its value when the flag is not given, a function of the config being resolved
    (`lambda c: c.preset.token`; may return None). choices, required, nargs, metavar: as argparse's.
    check: its validity rules (`valid`, `at_least`, `positive`, `rule`). convert: applied to the value
    the user gave (e.g. splitting comma-separated words).
    """
    rules = check if isinstance(check, tuple) else (check,)
    declared = Setting(group, help, default, preset, choices, required, rules, convert, nargs, metavar)
    return dataclasses.field(metadata={SETTING: declared})


def derived(value: Callable[[Any], Any], *, check: Rule | tuple[Rule, ...] = ()) -> Any:
    """A config field that is not a flag: `value` of the config being resolved, as `setting`'s preset."""
    rules = check if isinstance(check, tuple) else (check,)
    return dataclasses.field(metadata={SETTING: Setting(None, None, preset=value, rules=rules, flag=False)})


@dataclass(frozen=True)
class Declared:
    """A setting with what its annotation says: the flag's value type, whether it takes several, and
    whether it may be None."""

    name: str
    setting: Setting
    kind: type
    several: bool
    optional: bool

    def argparse_options(self) -> dict:
        s = self.setting
        options: dict[str, Any] = {"help": s.help, "default": None}
        if self.kind is bool:
            switch = s.preset is None and not s.default
            options["action"] = "store_true" if switch else argparse.BooleanOptionalAction
            return options
        if self.several:
            options["nargs"] = s.nargs or "+"
        if self.kind is not str:
            options["type"] = self.kind
        for key in ("choices", "metavar"):
            if getattr(s, key) is not None:
                options[key] = getattr(s, key)
        if s.required:
            options["required"] = True
        return options


def value_type(hint: Any) -> tuple[type, bool, bool]:
    """(type of one value, takes several, may be None) of an annotation: X | None -> X, optional;
    tuple[X, ...] -> X, several."""
    optional = typing.get_origin(hint) in (Union, types.UnionType)
    if optional:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


@functools.cache
def declared(cls: type) -> dict[str, Declared]:
    """Every setting of a config class, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if SETTING not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting(...) or derived(...)")
        out[f.name] = Declared(f.name, f.metadata[SETTING], *value_type(hints[f.name]))
    return out


def build_parser(cls: type, *, prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a config class's flags, grouped as declared; it applies no preset and no rule."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    groups: dict[str, Any] = {}
    for d in declared(cls).values():
        if not d.setting.flag:
            continue
        if d.setting.group not in groups:
            groups[d.setting.group] = parser.add_argument_group(d.setting.group)
        groups[d.setting.group].add_argument(f"--{d.name}", **d.argparse_options())
    return parser


class Resolving:
    """The config being resolved, as a preset function sees it: reading a setting resolves it (the flag's
    value, else its preset or default), and the config class's properties work as on the finished config.
    `given(name)` is what the command line said (None: not given)."""

    def __init__(self, cls: type, given: dict[str, Any]):
        self._cls, self._given, self._values, self._busy = cls, given, {}, set()

    def given(self, name: str) -> Any:
        return self._given.get(name)

    def __getattr__(self, name: str) -> Any:
        settings = declared(self._cls)
        if name in settings:
            return self.resolve(settings[name])
        attribute = getattr(self._cls, name, None)
        if isinstance(attribute, property):
            return attribute.fget(self)
        raise AttributeError(f"a preset reads {name!r}, which is neither a setting nor a property")

    def resolve(self, d: Declared) -> Any:
        if d.name in self._values:
            return self._values[d.name]
        if d.name in self._busy:
            raise RuntimeError(f"the presets of {sorted(self._busy)} read each other")
        self._busy.add(d.name)
        value = self._given.get(d.name)
        if value is not None and d.setting.convert is not None:
            value = d.setting.convert(value)
        if value is None:
            value = d.setting.preset(self) if d.setting.preset is not None else d.setting.default
        if d.several and not (value is None and d.optional):
            value = tuple(value or ())
        self._busy.discard(d.name)
        self._values[d.name] = value
        return value


def resolve(cls: type[C], flags: argparse.Namespace) -> C:
    """The config from parsed flags: every setting not given from its preset or default."""
    view = Resolving(cls, vars(flags))
    return cls(**{name: view.resolve(d) for name, d in declared(cls).items()})


def problems(config: Any, given: Sequence[str] = ()) -> Iterator[str]:
    """The message of every rule `config` breaks: the settings named in `given` first (what the user typed
    is what they can change), then the others, each in declaration order."""
    settings = declared(type(config))
    order = sorted(settings, key=lambda name: name not in given)
    for name in order:
        for r in settings[name].setting.rules:
            message = r.broken(name, config)
            if message is not None:
                yield message


def parse(cls: type[C], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> C:
    """Flags -> presets and defaults -> rules; a broken rule exits with status 2 and says what to do."""
    flags = parser.parse_args(argv)
    config = resolve(cls, flags)
    given = [name for name, value in vars(flags).items() if value is not None]
    for message in problems(config, given):
        parser.error(message)
    return config
