"""The package's layers: core library → trainer (owl_lightning.train) → applications (owl_lightning.apps).

Read from the source (every import, including those inside functions), so a lazy import cannot hide
a dependency, and checked once more at run time for the one that matters most to users: loading a
model for inference must not need Lightning.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "owl_lightning"
CORE = ("config", "extras", "files", "checkpoints", "export", "inference", "models", "data")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute names."""
    names = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


MODULES = {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    """``core``, ``train``, ``apps`` or ``cli`` (the entry point that may use them all)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in CORE:
        return "core"
    return parts[1] if parts[1] in ("train", "apps") else "cli"


def own_imports(module: str) -> set[str]:
    return {name for name in MODULES[module] if name in MODULES and name != module}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) == "core"))
def test_the_core_library_imports_neither_lightning_nor_the_trainer_nor_the_apps(module):
    forbidden = {n for n in MODULES[module] if n.split(".")[0] in ("lightning", "pytorch_lightning")}
    forbidden |= {n for n in own_imports(module) if layer(n) in ("train", "apps", "cli")}
    assert not forbidden, f"{module} imports {sorted(forbidden)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("owl_lightning.models")))
def test_models_import_neither_data_nor_training(module):
    forbidden = {n for n in own_imports(module) if n.startswith(("owl_lightning.data", "owl_lightning.train"))}
    assert not forbidden, f"{module} imports {sorted(forbidden)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) == "train"))
def test_the_trainer_does_not_import_the_apps(module):
    forbidden = {n for n in own_imports(module) if layer(n) in ("apps", "cli")}
    assert not forbidden, f"{module} imports {sorted(forbidden)}"


def test_no_import_cycles():
    graph = {module: {n for n in own_imports(module) if not module.startswith(n + ".")} for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " → ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_loading_a_model_for_inference_does_not_import_lightning():
    code = (
        "import sys, owl_lightning.checkpoints, owl_lightning.inference, owl_lightning.export, owl_lightning.data.processor; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_layout_test_sees_every_layer():
    """Guards the test itself: a rename that empties a layer would make the rules above vacuous."""
    layers = {layer(m) for m in MODULES}
    assert layers == {"core", "train", "apps", "cli"}
    assert "owl_lightning.models.abstractor" in MODULES and "owl_lightning.train.system" in MODULES
    assert "lightning.pytorch" in MODULES["owl_lightning.train.system"] or any(
        n.startswith("lightning") for n in MODULES["owl_lightning.train.system"]
    )


def test_a_missing_optional_dependency_names_the_extra_that_installs_it():
    from owl_lightning.extras import require

    assert require("json", "eval").dumps([]) == "[]"
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'owl_lightning\[eval\]'"):
        require("no_such_module_owl.data", "eval")
