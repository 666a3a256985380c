"""The package map (docs/architecture.md): no import cycle in recbole_genrec/, and lower layers never import
higher ones. A static check over every ``import`` in the source, at module level and inside functions."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "recbole_genrec"

# Layers, lowest first (docs/architecture.md, "Import layers"). A module may import its own layer or lower
# ones; the first matching prefix decides a module's layer.
LAYERS = [
    ("utils", ["recbole_genrec", "recbole_genrec.utils"]),
    ("checks / tokenizer", ["recbole_genrec.checks", "recbole_genrec.tokenizer"]),
    ("data", ["recbole_genrec.data"]),
    ("evaluator / trainer", ["recbole_genrec.evaluator", "recbole_genrec.trainer"]),
    ("model", ["recbole_genrec.model"]),
    ("registry / config", ["recbole_genrec.registry", "recbole_genrec.config"]),
    ("run", ["recbole_genrec.quick_start"]),
    ("tools", ["recbole_genrec.compare", "recbole_genrec.hyper", "recbole_genrec.beam_analysis",
               "recbole_genrec.build_ids", "recbole_genrec.recommend"]),
]

# Upward imports that are allowed, each inside a function and each with its reason (docs/architecture.md).
ALLOWED_UPWARD = {
    ("recbole_genrec.data.collab_embeddings", "recbole_genrec.quick_start"):
        "trains an auxiliary stock SASRec through the run pipeline (LETTER's CF embeddings, GenPlugin's "
        "retrieval); quick_start reaches no data module statically, so this closes no cycle",
}


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules():
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph():
    """``{module: {imported module: lazy?}}`` for imports of recbole_genrec modules."""
    modules = all_modules()
    graph = {}
    for name, path in modules.items():
        edges = {}
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import submodule` imports the submodule
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    edges[target] = edges.get(target, True) and node.col_offset > 0
        graph[name] = edges
    return graph


def layer_of(module):
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    missing = [m for m in all_modules() if layer_of(m) is None]
    assert not missing, f"give these modules a layer in tests/test_architecture.py and docs/architecture.md: {missing}"


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    bad = []
    for module, edges in graph.items():
        for target, lazy in edges.items():
            if layer_of(target) > layer_of(module):
                if (module, target) in ALLOWED_UPWARD and lazy:
                    continue
                bad.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target)][0]})")
    assert not bad, "\n".join(bad)
    for module, target in ALLOWED_UPWARD:  # keep the allow-list honest
        assert target in graph[module], f"{module} no longer imports {target}: drop it from ALLOWED_UPWARD"


def test_utils_is_the_floor_in_a_fresh_interpreter():
    code = ("import sys, recbole_genrec.utils; "
            "print(sorted(m for m in sys.modules if m.startswith('recbole_genrec')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['recbole_genrec', 'recbole_genrec.utils']"


def test_the_checker_sees_cycles_and_upward_imports():
    assert cycles({"a": {"b": False}, "b": {"a": True}, "c": {}}) == [["a", "b"]]
    assert layer_of("recbole_genrec.model.tiger") > layer_of("recbole_genrec.data.semantic_ids")
    assert layer_of("recbole_genrec.utils") == 0 and layer_of("recbole_genrec.tokenizer.rqvae") == 1
