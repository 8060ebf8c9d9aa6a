"""The package's structure, read from its source (docs/design.md, "Parts and the import rule").

- imports run one way: cli -> viz -> circuits -> dictionaries; inside circuits, engine and graph never import
  each other and only interventions and the tracing bridge may import both; nothing below cli imports it;
- no import cycle between modules (module-level imports; lazy imports inside functions are allowed to wait);
- no package module over 400 lines;
- the replacement MLP formula is written once (``DictionarySet.layer_output`` adds b_dec and the skip path) and
  MLP outputs are replaced through one hook registration (``replace_mlp_outputs``);
- the engine names no module of the model: module names live in the family's Architecture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "viz", "circuits", "dictionaries")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """The package modules that module ``name`` imports (relative imports resolved; ``if TYPE_CHECKING`` blocks
    left out; with ``top_level_only``, imports inside functions left out too)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import | ast.ImportFrom) and not (top_level_only and in_function):
                for target in _targets(child, package):
                    resolved = _resolve(target)
                    if resolved is not None:
                        found.add(resolved)
            visit(child, nested)

    visit(tree, False)
    found.discard(name)
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, base] if base else parts)
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def _resolve(target: str) -> str | None:
    """The longest known module that ``target`` names (``from x import y`` may name a module or an attribute)."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


ALL_IMPORTS = {name: _imports(name, path, top_level_only=False) for name, path in MODULES.items()}


SUB_PACKAGES = ("engine", "graph", "interventions", "attention", "many")


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "circuits" and len(parts) > 1 and parts[1] in SUB_PACKAGES:
        return f"circuits.{parts[1]}"
    return module if parts[0] == "circuits" else parts[0]


# what each part may import (besides itself and the standard/third-party libraries)
ALLOWED = {
    "dictionaries": set(),
    "circuits.settings": set(),
    "circuits.engine": {"dictionaries", "circuits.settings"},
    "circuits.graph": {"dictionaries", "circuits.settings"},
    "circuits.interventions": {"dictionaries", "circuits.settings", "circuits.engine", "circuits.graph"},
    "circuits.attention": {"dictionaries", "circuits.settings", "circuits.engine", "circuits.graph",
                           "circuits.interventions"},
    "circuits.many": {"dictionaries", "circuits.settings", "circuits.graph"},
    "circuits.tracing": {"dictionaries", "circuits.settings", "circuits.engine", "circuits.graph"},
    "circuits": {"circuits.settings", "circuits.engine", "circuits.graph", "circuits.interventions",
                 "circuits.attention", "circuits.many"},
    "viz": {"dictionaries", "circuits", "circuits.settings", "circuits.engine", "circuits.graph",
            "circuits.interventions", "circuits.attention", "circuits.many", "circuits.tracing"},
}


def test_the_modules_were_found():
    assert {"circuits.engine.attribution", "circuits.graph.attribution_graph", "circuits.interventions.validation",
            "dictionaries.models.architecture", "dictionaries.formats.registry", "cli.app"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    part = _layer(module)
    if part == "cli":
        return
    allowed = ALLOWED[part] | {part}
    wrong = sorted(m for m in ALL_IMPORTS[module] if _layer(m) not in allowed)
    assert not wrong, f"{module} ({part}) imports {wrong}; see the import rule in circuits/__init__.py"


def test_no_import_cycles():
    graph = {name: _imports(name, path, top_level_only=True) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def _calls(path: Path, method: str) -> int:
    tree = ast.parse(path.read_text())
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr == method)


def test_the_replacement_formula_is_written_once():
    """b_dec is added to a layer's output in one place (DictionarySet.layer_output); refit only edits it."""
    users = {name for name, path in MODULES.items() if _calls(path, "decoder_bias")}
    assert users == {"dictionaries.dictionary_set", "dictionaries.training.refit"}, users
    assert _calls(MODULES["dictionaries.dictionary_set"], "decoder_bias") == 1
    # every caller of the formula goes through ReplacementMlp (or DictionarySet.decode, the dense training form)
    for module in ("circuits.engine.replacement", "circuits.interventions.frozen_model",
                   "circuits.interventions.feature_interventions", "dictionaries.evaluation"):
        assert "ReplacementMlp(" in MODULES[module].read_text(), module


def test_mlp_outputs_are_replaced_through_one_hook_registration():
    """Only hook_sites (replace_mlp_outputs, record_mlp_io) and the clean run's recorder hook the MLP sites."""
    users = {name for name, path in MODULES.items()
             if _calls(path, "mlp_output_module") or _calls(path, "mlp_input_module")}
    assert users <= {"dictionaries.models.hook_sites", "dictionaries.models.loading", "circuits.engine.clean_run",
                     "circuits.interventions.frozen_model", "circuits.engine.linear_backward"}, users
    replacing = {name for name, path in MODULES.items() if "mlp_output_module(" in path.read_text()
                 and "register_forward_hook" in path.read_text()}
    assert replacing <= {"dictionaries.models.hook_sites", "circuits.engine.clean_run"}, replacing


GEMMA_MODULE_NAMES = {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                      "post_feedforward_layernorm", "self_attn", "o_proj", "v_proj", "q_proj", "k_proj", "q_norm",
                      "k_norm", "embed_tokens", "num_key_value_groups"}


def test_only_the_family_description_names_model_modules():
    allowed = {"dictionaries.models.architecture", "dictionaries.config"}  # config: the saved hook-site metadata
    offenders = {}
    for name, path in MODULES.items():
        if name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in GEMMA_MODULE_NAMES or (
                    isinstance(node, ast.Constant) and node.value in GEMMA_MODULE_NAMES):
                offenders.setdefault(name, []).append(getattr(node, "attr", None) or node.value)
    assert not offenders, f"these modules name model modules instead of reading the Architecture: {offenders}"
