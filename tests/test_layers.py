"""The import rule of docs/architecture.md: imports point down, and stages never import each other
(the workflows that chain stages, pipeline and the canary audit, sit one layer above them). Checked on
the source with `ast`, function-local imports included."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gmtext"

# higher number = higher layer; a module may import its own layer or lower ones
LAYERS = {
    "cli": 6,
    "workflows": 5,
    "stages": 4,
    "runtime": 3,
    "matching": 2,
    "finetune": 2,
    "privacy": 2,
    "evolution": 2,
    "data": 1,
    "models": 1,
    "gradients": 1,
    "sketch": 1,
    "readability": 1,
    "config": 1,
    "artifacts": 1,
    "tracking": 1,
    "errors": 1,
    "conf": 1,
    "__init__": 1,
}
# the privacy ledger is a record format the data layer reads (a synthetic set's ledger)
MODULE_LAYERS = {"privacy.ledger": 1}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PKG).with_suffix("").parts)


def _layer(module: str) -> int:
    for prefix, layer in MODULE_LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return LAYERS[module.split(".")[0]]


def _imports(path: Path) -> list[str]:
    """gmtext modules imported by `path` (absolute names without the `gmtext.` prefix)."""
    mod = _module(path).split(".")
    package = mod[:-1] if path.name != "__init__.py" else mod[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [".".join([*target, a.name]) for a in node.names] if not node.module else [".".join(target)]
            elif node.module and node.module.split(".")[0] == "gmtext":
                names = [node.module[len("gmtext.") :]] if node.module != "gmtext" else [a.name for a in node.names]
            else:
                continue
            out += [n for n in names if n]
        elif isinstance(node, ast.Import):
            out += [a.name[len("gmtext.") :] for a in node.names if a.name.startswith("gmtext.")]
    return out


def _violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module(path)
        for imp in _imports(path):
            if imp.split(".")[0] not in LAYERS:
                continue
            if _layer(imp) > _layer(me):
                bad.append(f"{me} (layer {_layer(me)}) imports {imp} (layer {_layer(imp)})")
            parts = me.split(".")
            if parts[0] == "stages" and len(parts) > 1 and imp.startswith("stages.") and imp.split(".")[1] != parts[1]:
                bad.append(f"stage {me} imports stage {imp}")
    return bad


def test_imports_point_down_and_stages_do_not_import_each_other():
    assert _violations() == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """A stage importing another stage, a stage importing a workflow, and the data layer importing a
    stage are all caught."""
    import shutil

    fake = tmp_path / "gmtext"
    shutil.copytree(PKG, fake, ignore=shutil.ignore_patterns("__pycache__", "conf", "*.jsonl", "*.json"))
    (fake / "stages" / "select.py").write_text(
        (fake / "stages" / "select.py").read_text() + "\nfrom .generate import run_generate\n"
    )
    (fake / "data" / "synthetic.py").write_text(
        (fake / "data" / "synthetic.py").read_text() + "\nfrom ..stages import merge\n"
    )
    (fake / "stages" / "merge.py").write_text(
        (fake / "stages" / "merge.py").read_text() + "\nfrom ..workflows.pipeline import run_pipeline\n"
    )
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    bad = _violations()
    assert "stages.merge (layer 4) imports workflows.pipeline (layer 5)" in bad
    assert "stage stages.select imports stage stages.generate" in bad
    assert any(b.startswith("data.synthetic (layer 1) imports stages") for b in bad)
