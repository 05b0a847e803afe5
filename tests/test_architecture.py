"""The layers of docs/architecture.md, read from the code: which package imports which.

Every import of a module of this project, top-level or inside a function, is read with `ast`
(nothing is imported), and held against the rules: imports run down only, `sharding/` and
`pallas_kernels/` know nothing of the model, `infer/` and `io/` never import `train/` or each
other, and no kernel file reaches into another kernel file's private names.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("dsv3_jax", "sharding", "pallas_kernels")


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every project import in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return [(m, names) for m, names in out if m.split(".")[0] in PACKAGES]


def _project_files():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _edges():
    return [(_module(f), m, names) for f in _project_files() for m, names in _imports(f)]


def test_sharding_and_kernels_never_import_the_model():
    bad = [(a, b) for a, b, _ in _edges()
           if a.split(".")[0] in ("sharding", "pallas_kernels") and b.startswith("dsv3_jax")
           and a != "sharding.dump"]  # the thin entry of `python -m sharding.dump`
    assert not bad, bad


def test_kernels_never_import_sharding():
    bad = [(a, b) for a, b, _ in _edges() if a.startswith("pallas_kernels") and
           b.startswith("sharding")]
    assert not bad, bad


def test_the_model_core_never_imports_train_infer_io_or_the_tools():
    core = [a for a in {a for a, _, _ in _edges()} if a.startswith("dsv3_jax.") and
            a.split(".")[1] not in ("train", "infer", "io", "plan", "testing")]
    above = ("dsv3_jax.train", "dsv3_jax.infer", "dsv3_jax.io", "dsv3_jax.plan",
             "dsv3_jax.testing")
    bad = [(a, b) for a, b, _ in _edges() if a in core and b.startswith(above)]
    assert not bad, bad


def test_train_infer_and_io_stay_apart():
    """train/ may use infer/ (GRPO rollouts, end-of-run samples) and io/ (tokenizers, HF
    folders for SFT and GRPO); infer/ and io/ never import train/, nor each other."""
    wings = ("train", "infer", "io")
    allowed = {("train", "infer"), ("train", "io")}
    bad = []
    for a, b, _ in _edges():
        pa, pb = a.split("."), b.split(".")
        if (len(pa) > 2 and len(pb) > 1 and pa[1] in wings and pb[1] in wings and pa[1] != pb[1]
                and (pa[1], pb[1]) not in allowed):
            bad.append((a, b))
    assert not bad, bad


def test_no_kernel_file_uses_another_kernel_files_privates():
    bad = [(a, b, n) for a, b, names in _edges() if a.startswith("pallas_kernels")
           for n in names if n.startswith("_") and b != a and b != "pallas_kernels._mosaic"
           and (b, n) != ("pallas_kernels", "_mosaic")]  # the shared toolkit itself
    assert not bad, bad
    # attribute access through an imported module: `gm._name`
    for f in sorted((ROOT / "pallas_kernels").glob("*.py")):
        tree = ast.parse(f.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and node.module == "pallas_kernels" for a in node.names if a.name != "_mosaic"}
        used = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and
                isinstance(n.value, ast.Name) and n.value.id in aliases and n.attr.startswith("_")]
        assert not used, (f.name, used)


def test_no_import_cycles_between_project_modules():
    graph: dict[str, set[str]] = {}
    modules = {_module(f) for f in _project_files()}
    for a, b, names in _edges():
        targets = {f"{b}.{n}" for n in names if f"{b}.{n}" in modules} or {b}
        graph.setdefault(a, set()).update(t for t in targets if t in modules and t != a)
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
