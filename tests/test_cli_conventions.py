"""The conventions every `kataru` command keeps: each command and each mode of one (`kataru eval jglue`,
`kataru bench serve`) answers `--help`; every option it accepts is read by the code that runs it (none is
accepted and silently ignored); an option of another mode, or one that means nothing without (or beside)
another, is refused in one line naming where it belongs; and every example in the README's command table
parses."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import shlex
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

import pytest

from kataru.cli import COMMANDS, build_parser, command, main
from kataru.commands import common
from kataru.commands.options import Parser, leaves, subcommands

ROOT = Path(__file__).resolve().parents[1]


def every_leaf() -> Iterator[tuple[list[str], Parser]]:
    """(the words that reach it, the parser) of every command without modes and every mode."""
    def walk(parser: Parser, words: list[str]) -> Iterator[tuple[list[str], Parser]]:
        modes = subcommands(parser)
        if modes is None:
            yield words, parser
            return
        for name, child in modes.choices.items():
            yield from walk(child, [*words, name])

    yield from walk(build_parser([], every=True), [])


LEAVES = {" ".join(words): parser for words, parser in every_leaf()}


def test_every_command_and_mode_is_walked() -> None:
    assert {name.split()[0] for name in LEAVES} == set(COMMANDS)
    assert {"eval jglue", "eval lm-eval", "eval mt-bench", "eval jcommonsenseqa", "eval perplexity", "bench speed",
            "bench plan", "bench speculate", "bench serve", "data clean"} <= set(LEAVES)


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_help_exits_0_and_speaks_of_its_own_mode(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*name.split(), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kataru {name}")
    others = [m for m in LEAVES if m != name and m.split()[0] == name.split()[0] and len(m.split()) > 1]
    for other in others:  # the help of a mode never describes another as `<mode>: ...`
        assert f"{other.split()[-1]}:" not in out.replace(f"usage: kataru {name}", ""), (name, other)


# --- every option is read where it is accepted --------------------------------------------------------------------
def handler_of(name: str, parser: Parser) -> FunctionType:
    handler = parser.get_default("handler")
    return handler if handler is not None else command(name.split()[0]).run


def reads(function: FunctionType, seen: set[Any] | None = None) -> set[str]:
    """The attributes of `args` a function reads, following the calls it makes to functions of kataru.commands
    (the shared helpers of commands/common.py among them)."""
    seen = set() if seen is None else seen
    if function in seen:
        return set()
    seen.add(function)
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    names: set[str] = set()
    module = importlib.import_module(function.__module__)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
            names.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "args":
            key = node.args[1]
            if isinstance(key, ast.Constant):
                names.add(key.value)
            else:  # getattr(args, f.name) for f in fields(Config): every field of that dataclass
                names |= dataclass_fields_read(tree, module)
        if isinstance(node, ast.Call):
            callee = resolve(node.func, module)
            if callee is not None:
                names |= reads(callee, seen)
    return names


def resolve(func: ast.expr, module: ModuleType) -> FunctionType | None:
    target: Any = None
    if isinstance(func, ast.Name):
        target = getattr(module, func.id, None)
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        target = getattr(getattr(module, func.value.id, None), func.attr, None)
    ok = isinstance(target, FunctionType) and target.__module__.startswith("kataru.commands")
    return target if ok else None


def dataclass_fields_read(tree: ast.AST, module: ModuleType) -> set[str]:
    """The fields of the dataclasses named in `fields(X)` within a function (imported there or at the top)."""
    imports = {alias.asname or alias.name: node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names}
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "fields":
            name = node.args[0].id  # type: ignore[attr-defined]
            owner = getattr(module, name, None) or getattr(importlib.import_module(imports[name]), name)
            out |= {f.name for f in dataclasses.fields(owner)}
    return out


def unread(parser: argparse.ArgumentParser, handler: FunctionType) -> set[str]:
    accepted = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    return accepted - reads(handler)


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_every_option_is_read_by_the_code_that_runs_it(name: str) -> None:
    parser = LEAVES[name]
    ignored = unread(parser, handler_of(name, parser))
    assert not ignored, f"`kataru {name}` accepts {sorted(ignored)} and never reads them"


def test_the_check_finds_an_option_nobody_reads() -> None:
    """The check above, shown to fail: an option no code path reads is reported, one read in a helper is not."""
    def handler(args: argparse.Namespace) -> None:
        print(args.used, common.sampling(args))

    parser = Parser(prog="kataru demo")
    for flag in ("--used", "--unused", "--temperature"):
        parser.add_argument(flag)
    assert unread(parser, handler) == {"unused"}


# --- options where they mean nothing -----------------------------------------------------------------------------
def value_for(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))]
    return ["1" if action.type in (int, float) else "x"]


def required(parser: Parser) -> list[str]:
    """The smallest argv the parser accepts: a value for each required positional and option."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings and action.nargs not in ("?", "*") and not isinstance(
                action, argparse._SubParsersAction):
            argv.append("x")
        elif action.required and action.option_strings:
            argv += [action.option_strings[0], *value_for(action)]
    return argv


def option(parser: Parser, name: str) -> list[str]:
    action = next(a for a in parser._actions if name in a.option_strings or a.dest == name)
    if not action.option_strings:
        return ["somefolder"]
    return [name, *value_for(action)]


RULES = [(name, kind, flags, dependent) for name, parser in LEAVES.items()
         for kind, flags, options, _ in parser.rules for dependent in options]


def test_the_rules_cover_the_known_cases() -> None:
    found = {(name, dependent) for name, _, _, dependent in RULES}
    assert {("eval mt-bench", "--judge-url"), ("serve", "--ray-address"), ("sft", "--lora-r"),
            ("dpo", "--lora-targets"), ("pretrain", "--dim"), ("generate", "--inputs"),
            ("bench serve", "--quantize")} <= found


@pytest.mark.parametrize("name, kind, flags, dependent", RULES, ids=[f"{r[0]} {r[3]}" for r in RULES])
def test_an_option_where_it_means_nothing_is_refused(name: str, kind: str, flags: tuple[str, ...], dependent: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    parser = LEAVES[name]
    base = [*name.split(), *required(parser)]
    if dependent == "model":  # the positional must come before any other positional filler
        base = [*name.split(), "somefolder", *required(parser)[1:]]
        extra = []
    else:
        extra = option(parser, dependent)
    flag = option(parser, flags[0])
    wrong = [*base, *extra] + (flag if kind == "without" else [])
    right = [*base, *extra] + (flag if kind == "with" else [])
    with pytest.raises(SystemExit) as exit_:
        build_parser(wrong).parse_args(wrong)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"kataru {name}: error: {dependent}") and flags[0] in err, err
    build_parser(right).parse_args(right)  # and where it means something, it is taken


def test_an_option_of_another_mode_names_the_mode_it_belongs_to(capsys: pytest.CaptureFixture[str]) -> None:
    cases = [(["eval", "jglue", "--num-fewshot", "3"], "kataru eval jglue", "`kataru eval lm-eval`"),
             (["eval", "jcommonsenseqa", "--judge-url", "u"], "kataru eval jcommonsenseqa", "`kataru eval mt-bench`"),
             (["bench", "speed", "tiny", "--concurrency", "8"], "kataru bench speed", "`kataru bench serve`"),
             (["generate", "hi", "--api-key", "k"], "kataru generate", "`kataru serve`")]
    for argv, where, owner in cases:
        with pytest.raises(SystemExit):
            build_parser(argv).parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"{where}: error: {argv[-2]} is an option of") and owner in err, err
    with pytest.raises(SystemExit):
        build_parser(["info", "--no-such-option"]).parse_args(["info", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_each_evaluation_takes_its_own_tasks() -> None:
    """The issue's case: `--tasks` is JGLUE's own option in `kataru eval jglue`, lm-eval's in `kataru eval lm-eval`."""
    argv = ["eval", "jglue", "./model", "--tasks", "jcommonsenseqa,jnli"]
    args = build_parser(argv).parse_args(argv)
    assert args.tasks == "jcommonsenseqa,jnli" and args.handler.__name__ == "run_jglue" and args.model == "./model"
    argv = ["eval", "lm-eval", "--tasks", "my_task", "--include-path", "./tasks"]
    args = build_parser(argv).parse_args(argv)
    assert args.tasks == "my_task" and args.handler.__name__ == "run_harness"


# --- the README's command table ----------------------------------------------------------------------------------
def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    if "\n## Commands" not in text:
        return []
    table = text[text.index("\n## Commands") + 1:]
    table = table[:table.index("\n## ")]
    return [m for line in table.splitlines() if line.startswith("|")
            for m in re.findall(r"`(kataru [^`]+)`", line)]


def test_the_readme_has_one_example_per_command() -> None:
    examples = readme_examples()
    assert {e.split()[1] for e in examples} == set(COMMANDS), "the README's command table lacks a command"


def usage_examples() -> list[str]:
    """The command lines of docs/usage.md's example block, which the README's table links to."""
    text = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    block = text[text.index("```bash"):text.index("```", text.index("```bash") + 3)]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("kataru ")]


@pytest.mark.parametrize("example", readme_examples() + usage_examples())
def test_each_readme_example_parses(example: str) -> None:
    argv = shlex.split(example.replace("$KATARU_DATA", "data"))[1:]
    build_parser(argv).parse_args(argv)  # an unknown option or mode exits 2 here


def test_parsers_are_kataru_parsers() -> None:
    """Every parser is built on commands.options.Parser, so every rule above applies to each."""
    for parser in leaves(build_parser([], every=True)):
        assert isinstance(parser, Parser), parser.prog
