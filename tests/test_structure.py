"""The shape of the code: no import cycles (imports inside functions included), no very long
functions outside the models, config.py free of method keys, ConfigError importing nothing."""

import ast
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "jaxkd")


def _modules():
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(path, name, modules):
    """jaxkd modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # "from jaxkd.train import loop" imports the submodule jaxkd.train.loop
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def test_no_import_cycles_counting_imports_inside_functions():
    modules = _modules()
    graph = {m: _imports(p, m, modules) for m, p in modules.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "active"
        for n in sorted(graph[m]):
            if state.get(n) == "active":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
    assert graph["jaxkd.errors"] == set()  # ConfigError lives in a module that imports nothing of jaxkd
    assert graph["jaxkd.config"] <= {"jaxkd.errors"}


def test_no_function_longer_than_120_lines_outside_models():
    long = []
    for name, path in _modules().items():
        if name.startswith("jaxkd.models"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 120:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_config_holds_no_method_keys():
    from jaxkd import config as config_lib

    assert config_lib.base_config().method.to_dict() == {"name": "hinton_kd"}
    tree = ast.parse(open(os.path.join(PKG, "config.py")).read())
    legacy = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name == "upgrade_config")
              or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "_LEGACY_METHOD_DEFAULTS"
                                                    for t in n.targets))]
    for node in legacy:  # the upgrade of configs stored by older versions may name them, nothing else
        tree.body.remove(node)
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not strings & {"temperature", "alpha", "gamma", "mode", "kd_temperature"}


def test_every_built_in_method_registers_itself():
    import jaxkd.methods
    from jaxkd.core import list_recipes

    assert set(list_recipes()) >= {"ce", "hinton_kd", "fitnets", "fitnets_hint", "at", "fsp", "bss", "apprentice",
                                   "label_refinery", "ensemble_kd", "random_teacher_kd", "relabel_kd", "meal_v2"}
    assert jaxkd.methods.build_recipe({"name": "ce"}).name == "ce"
