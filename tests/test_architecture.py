"""The shape of the source: no import cycle among its modules, no class too long to read, and a
training room that knows no optimizer by kind.

Imports are read with ``ast``, not by importing: every import statement of a module counts,
those inside functions and under ``TYPE_CHECKING`` too. Importing ``a.b.c`` also imports the
packages ``a`` and ``a.b`` (their ``__init__`` runs first), except the packages that hold the
importing module itself: Python runs those before the module, so reaching a sibling through them
adds no dependency. Importing a name from such a package (``from a import x`` inside ``a.b``, ``x``
no module) does count, since ``x`` must then exist in ``a/__init__.py`` already.
"""

import ast
import textwrap
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "source"
LONGEST_CLASS = 400
"""Lines a class may have, from its ``class`` line to its last line."""


def module_names(root):
    """{dotted module name: file} of every module under ``root`` (a package's name is its folder's)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _packages_holding(name):
    """The packages a module sits in: "a.b.c" -> {"a", "a.b"}."""
    parts = name.split(".")
    return {".".join(parts[:depth]) for depth in range(1, len(parts))}


def imported_modules(name, path, known):
    """The modules among ``known`` that importing module ``name`` (from file ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    holding = _packages_holding(name)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # "from a.b import c" imports the module a.b.c when there is one, else a name of a.b.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target not in known:
                continue
            reached = {target} | (_packages_holding(target) - holding)
            imported |= {module for module in reached if module in known and module != name}
    return imported


def import_graph(root):
    """{module: modules it imports} over every module under ``root``."""
    known = module_names(root)
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def import_cycles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, lowest, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(module):
        index[module] = lowest[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                lowest[module] = min(lowest[module], lowest[imported])
            elif imported in on_stack:
                lowest[module] = min(lowest[module], index[imported])
        if lowest[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def long_classes(root, limit):
    """"path: Class (N lines)" for every class under ``root`` longer than ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root.parent)}: {node.name} ({length} lines)")
    return found


def test_no_import_cycle_among_source_modules():
    cycles = import_cycles(import_graph(SOURCE))
    assert not cycles, "import cycles among source modules: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_no_class_in_source_is_longer_than_400_lines():
    over = long_classes(SOURCE, LONGEST_CLASS)
    assert not over, f"classes over {LONGEST_CLASS} lines (split them): " + "; ".join(over)


def _write_package(root, files):
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_a_cycle_through_a_package_init_a_function_and_type_checking_is_found(tmp_path):
    _write_package(
        tmp_path,
        {
            "town/__init__.py": "",
            "town/shop/__init__.py": "from town.shop.till import Till\n",
            "town/shop/till.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from town.stock.shelf import Shelf
            """,
            "town/shop/door.py": "",
            "town/stock/__init__.py": "",
            "town/stock/shelf.py": """
                def restock():
                    from town.shop.door import open_door
            """,
            "town/stock/label.py": "from town.stock.shelf import restock\n",
        },
    )
    graph = import_graph(tmp_path / "town")
    assert graph["town.stock.shelf"] == {"town.shop", "town.shop.door"}
    assert graph["town.stock.label"] == {"town.stock.shelf"}
    # town.shop.till -> town.stock.shelf (TYPE_CHECKING) -> town.shop (in a function) -> town.shop.till.
    assert import_cycles(graph) == [["town.shop", "town.shop.till", "town.stock.shelf"]]


def test_reaching_a_sibling_through_the_own_package_is_no_cycle_taking_a_name_from_it_is(tmp_path):
    _write_package(
        tmp_path,
        {
            "models/__init__.py": "from models.small import Small\nfrom .wide import Wide\nfrom .deep import Deep\n",
            "models/small.py": "from models.layers import block\n",
            "models/wide.py": "from . import layers\n",
            "models/deep.py": "from models import Small\n",
            "models/layers.py": "",
        },
    )
    graph = import_graph(tmp_path / "models")
    assert graph["models.small"] == graph["models.wide"] == {"models.layers"}
    assert import_cycles(graph) == [["models", "models.deep"]]


def test_a_class_longer_than_the_limit_is_named(tmp_path):
    _write_package(tmp_path, {"pieces/long.py": "class Long:\n" + "    x = 1\n" * 5, "pieces/short.py": "class A: ..."})
    assert long_classes(tmp_path / "pieces", 5) == ["pieces/long.py: Long (6 lines)"]


TRAINING = SOURCE / "training"


def optimizer_kind_checks(root, optimizer_names):
    """"path:line: what" for each place under ``root`` that tells optimizers apart: isinstance or
    issubclass, getattr on an optimizer, is_line_search, or an optimizer's registry or class name."""
    found = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
                subject = ast.unparse(node.args[0])
                if node.func.id in ("isinstance", "issubclass", "getattr", "hasattr") and "optimizer" in subject:
                    text = f"{node.func.id}({subject}, ...)"
            elif isinstance(node, (ast.Name, ast.Attribute)):
                name = node.id if isinstance(node, ast.Name) else node.attr
                if name == "is_line_search" or name in optimizer_names:
                    text = name
            elif isinstance(node, ast.Constant) and node.value in optimizer_names:
                text = repr(node.value)
            if text:
                found.append(f"{where}:{node.lineno}: {text}")
    return found


def test_the_training_room_knows_no_optimizer_by_kind():
    from source.optimizer import OPTIMIZERS

    names = set(OPTIMIZERS) | {optimizer_class.__name__ for optimizer_class in OPTIMIZERS.values()}
    checks = optimizer_kind_checks(TRAINING, names)
    assert not checks, "source/training tells optimizers apart (ask the stepper instead): " + "; ".join(checks)


def test_an_optimizer_kind_check_is_found(tmp_path):
    _write_package(
        tmp_path,
        {
            "room/loop.py": """
                def step(optimizer, experiment):
                    if isinstance(experiment.optimizer, object) or getattr(optimizer, "partial", False):
                        return experiment.is_line_search
                    return "lab_pal" if LabPal else None
            """,
        },
    )
    found = optimizer_kind_checks(tmp_path / "room", {"lab_pal", "LabPal"})
    assert sorted(entry.split(": ", 1)[1] for entry in found) == sorted(
        ["isinstance(experiment.optimizer, ...)", "getattr(optimizer, ...)", "is_line_search", "'lab_pal'", "LabPal"]
    )
