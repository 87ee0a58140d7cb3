"""The package's floors: a module imports only modules on its own floor or below (function-level imports
included), so the dependency graph has no cycle and no arrow back up; eval and train never import each
other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kataru"

FLOORS = [  # ground first
    ["errors", "files", "kernels", "dispatch", "charts"],
    ["config", "tokenizer"],
    ["model", "prompts", "runtime", "cards", "data"],
    ["checkpoint", "quantize", "sampling", "scoring", "grammar"],
    ["engine"],
    ["llm", "shapes"],
    ["eval"],
    ["bench", "bench_speculate", "train", "serve"],
    ["commands", "cli", "__main__", "__init__"],
]
FLOOR = {room: n for n, rooms in enumerate(FLOORS) for room in rooms}


def room(module: str) -> str:
    """kataru.engine.core -> engine; kataru.cli -> cli; kataru -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    module = "kataru." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kataru")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package of this module
                base = module.split(".")[: -node.level if path.name != "__init__.py" else len(module.split("."))]
                found.add(".".join([*base, node.module or ""]).rstrip("."))
            elif node.module and node.module.startswith("kataru"):
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names if node.module == "kataru"}
    return found


def modules() -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_room_has_a_floor() -> None:
    rooms = {room("kataru." + ".".join(Path(name).with_suffix("").parts)) for name in modules()}
    assert rooms <= set(FLOOR), sorted(rooms - set(FLOOR))


def test_no_module_imports_one_above_it() -> None:
    upward = []
    for name, targets in modules().items():
        own = room("kataru." + ".".join(Path(name).with_suffix("").parts))
        for target in targets:
            if target != "kataru" and FLOOR[room(target)] > FLOOR[own]:
                upward.append(f"{name} -> {target}")
    assert not upward, upward


def test_eval_and_train_do_not_import_each_other() -> None:
    crossing = [f"{name} -> {target}" for name, targets in modules().items() for target in targets
                if (name.startswith("eval/") and room(target) == "train")
                or (name.startswith("train/") and room(target) == "eval")]
    assert not crossing, crossing
