"""The shape the code keeps: stages are plugins the engine and the shared rules never name, no import circles,
short functions in the engine and the stages, and a stage that is one module plus its registry line."""

import ast
import re
from pathlib import Path

from lmtune.stages import STAGES

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lmtune"
STAGE_WORDS = re.compile(r"(?<![.\w])(" + "|".join(sorted(STAGES)) + r"|grpo)(?!\w)", re.IGNORECASE)


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (PACKAGE / folder).rglob("*.py"))


def test_the_engine_and_the_shared_rules_name_no_stage():
    named = []
    for path in sources("engine") + [PACKAGE / "config" / "rules.py"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if STAGE_WORDS.search(line):
                named.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not named, "\n".join(named)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every lmtune module `path` imports, at the top or inside a function (what only type checkers read left out),
    and the modules it names to `lazy(...)`."""
    tree = ast.parse(path.read_text())
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            checking.update(id(n) for n in ast.walk(node))
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != this:
            found.add(name)

    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy" and node.args:
            if isinstance(node.args[0], ast.Constant):
                add(node.args[0].value)
    return found


def test_no_import_circle():
    paths = sources(".")
    known = {module_name(p) for p in paths}
    graph = {module_name(p): imported_modules(p, known) for p in paths}
    # A package's __init__ runs before its modules: importing pkg.mod imports pkg. Leave that implied edge out,
    # but keep what each __init__ imports itself.
    circles = []
    for start in graph:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not circles, "\n".join(sorted(set(circles))[:10])


def test_no_function_over_80_lines_in_the_engine_and_the_stages():
    long = []
    for path in sources("engine", "stages"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_kto_is_one_module_plus_its_registry_line():
    """Only the registry imports the kto module, and nothing outside it uses what it defines."""
    kto = PACKAGE / "stages" / "kto.py"
    defined = {n.name for n in ast.parse(kto.read_text()).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    defined |= {t.id for n in ast.parse(kto.read_text()).body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    users = {}
    for path in sources("."):
        if path == kto:
            continue
        words = set(re.findall(r"\w+", path.read_text())) & (defined - {"torch", "batching", "losses", "IGNORE"})
        if words or re.search(r"from \.+kto import|stages\.kto", path.read_text()):
            users[str(path.relative_to(PACKAGE))] = sorted(words)
    assert users == {"stages/__init__.py": ["KTO_STAGE"]}, users
    registry = (PACKAGE / "stages" / "__init__.py").read_text()
    assert [line for line in registry.splitlines() if "KTO" in line] == [
        "from .kto import KTO_STAGE",
        "STAGES: dict[str, Stage] = {stage.name: stage for stage in (PT, SFT, RM, DPO, KTO_STAGE, PPO, GRPO)}",
    ]
