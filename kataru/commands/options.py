"""The parser every `kataru` command is built on: argparse with three rules of its own.

- A command with several modes (`kataru eval jglue`, `kataru bench serve`) gives each mode its own parser,
  whose help speaks of that mode only (`add_mode`).
- An option of another mode is refused with the mode it belongs to, not a bare "unrecognized arguments":
  `kataru eval jglue --num-fewshot 3` says that `--num-fewshot` is `kataru eval lm-eval`'s.
- An option that only means something beside another (`--lora-r` beside `--lora`) or never beside another
  (`--dim` beside `--init`) is refused when given where it would be ignored (`only_with`, `never_with`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rules: list[tuple[str, tuple[str, ...], tuple[str, ...], str]] = []
        self.everything: Callable[[], Parser] | None = None  # the parser with every command, for errors only

    # --- rules ---------------------------------------------------------------------------------------------
    def only_with(self, flags: str | tuple[str, ...], *options: str, why: str = "") -> None:
        """`options` are ignored unless one of `flags` is given: giving one alone is an error."""
        self.rules.append(("with", (flags,) if isinstance(flags, str) else flags, options, why))

    def never_with(self, flag: str, *options: str, why: str = "") -> None:
        """`options` are ignored when `flag` is given: giving both is an error."""
        self.rules.append(("without", (flag,), options, why))

    def given(self, name: str, namespace: argparse.Namespace, argv: Sequence[str]) -> bool:
        """Whether the user gave an option (by its flag in argv, or by a value other than its default)."""
        action = next(a for a in self._actions if name in a.option_strings or a.dest == name)
        typed = any(t == o or t.startswith(o + "=") for t in argv for o in action.option_strings)
        return typed or getattr(namespace, action.dest, action.default) != action.default

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        argv = list(args or [])
        namespace, extras = super().parse_known_args(argv, namespace)
        for kind, flags, options, why in self.rules:
            flagged = any(self.given(f, namespace, argv) for f in flags)
            for option in options:
                if self.given(option, namespace, argv) and flagged != (kind == "with"):
                    self.error(f"{option} {'needs' if kind == 'with' else 'means nothing with'} "
                               f"{' or '.join(flags)}{why and f' ({why})'}")
        return namespace, extras

    # --- an option of another mode ------------------------------------------------------------------------
    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = self.chosen(namespace)
            option = next((e.split("=")[0] for e in extras if e.startswith("-")), None)
            owners = [p.prog for p in leaves(self) if option and p is not chosen and has_option(p, option)]
            if option and not owners and self.everything is not None:
                owners = [p.prog for p in leaves(self.everything()) if has_option(p, option)
                          and not p.prog.startswith(chosen.prog + " ") and p.prog != chosen.prog]
            if owners:
                chosen.error(f"{option} is an option of `{'`, `'.join(owners)}`, not of `{chosen.prog}` "
                             f"(its options: {chosen.prog} --help)")
            chosen.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def chosen(self, namespace: argparse.Namespace) -> Parser:
        """The parser of the mode the namespace's subcommands chose."""
        parser: Parser = self
        while (modes := subcommands(parser)) is not None:
            name = getattr(namespace, modes.dest, None)
            if name not in modes.choices:
                break
            parser = modes.choices[name]
        return parser


def subcommands(parser: argparse.ArgumentParser) -> Any:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def leaves(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser that takes options and no subcommand: the modes, and the commands without modes."""
    modes = subcommands(parser)
    if modes is None:
        yield parser
        return
    for child in dict.fromkeys(modes.choices.values()):  # aliases map to one parser
        yield from leaves(child)


def has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in a.option_strings for a in parser._actions)


def add_modes(p: argparse.ArgumentParser, dest: str, metavar: str) -> Any:
    return p.add_subparsers(dest=dest, required=True, metavar=metavar)


def add_mode(modes: Any, name: str, help_text: str, handler: Callable[[argparse.Namespace], None],
             formatter: type[argparse.HelpFormatter] = argparse.HelpFormatter) -> Parser:
    """One mode of a command: its own parser and help, and the function that runs it (`args.handler`)."""
    p = modes.add_parser(name, help=help_text, description=help_text, formatter_class=formatter)
    p.set_defaults(handler=handler)
    return p
