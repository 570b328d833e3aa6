"""Imports flow one way (docs/design.md, "Layers"): each layer imports only the layers below it.

Two checks of the same table. Statically, every `from .x import` in ruozhi_ui (at module level or
inside a function: a late import is for start-up time, never a way round a cycle) goes downward.
At run time, importing each layer in a fresh interpreter loads only the layers below it, and torch,
gradio and triton only where the table says.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ruozhi_ui"

# layer -> (rank, its modules). A layer imports layers of lower rank, never one of its own rank or above
# (so `cuda` and `decoding`, both rank 5, never import each other). Keep in step with docs/design.md.
LAYERS = {
    "leaves": (0, ("errors", "i18n", "events", "specs", "capabilities", "anatomy", "cache")),
    "checkpoints": (1, ("checkpoints",)),
    "bounds": (1, ("bounds", "chats", "slots", "safelog")),
    "worker_protocol": (1, ("worker_protocol",)),
    "config": (2, ("config",)),
    "runs": (2, ("runs",)),
    "policy": (2, ("policy",)),
    "hub": (2, ("hub",)),
    "plots": (2, ("plots",)),
    "data": (3, ("data", "encoding", "stats")),
    "models": (4, ("models", "preflight")),
    "cuda": (5, ("cuda",)),
    "decoding": (5, ("decoding",)),
    "train": (6, ("train",)),
    "generation": (7, ("generation",)),
    "zerogpu": (8, ("zerogpu",)),
    "export": (8, ("export",)),
    "launch": (9, ("launcher",)),
    "jobs": (10, ("jobs",)),
    "cli": (11, ("cli", "__main__")),
    "ui": (11, ("ui",)),
}


def layer_of(module: str) -> str:
    """'ruozhi_ui.cuda.graph_step' -> 'cuda'."""
    first = module.split(".")[1]
    return next(name for name, (_, modules) in LAYERS.items() if first in modules)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> list[tuple[str, str, int]]:
    """(importing module, imported ruozhi_ui module, line) for every relative import in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                targets = [".".join(base + [node.module])] if node.module else \
                    [".".join(base + [alias.name]) for alias in node.names]
                found += [(module, target, node.lineno) for target in targets]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ruozhi_ui"):
                found.append((module, node.module, node.lineno))
            elif isinstance(node, ast.Import):
                found += [(module, alias.name, node.lineno) for alias in node.names if alias.name.startswith("ruozhi_ui")]
    return found


def test_every_module_of_the_package_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        if path.parent != PACKAGE or path.name != "__init__.py":
            layer_of(module_name(path))  # StopIteration names a module the table forgot


def test_every_import_in_the_package_goes_to_a_lower_layer():
    wrong = []
    for module, target, line in package_imports():
        if module.count(".") == 0 or target == "ruozhi_ui":
            continue
        source, dest = layer_of(module), layer_of(target)
        if source != dest and LAYERS[dest][0] >= LAYERS[source][0]:
            wrong.append(f"{module}:{line} imports {target} ({source} -> {dest})")
    assert wrong == []


# ---------------------------------------------------------------- at run time, in fresh interpreters

# what importing the layer's modules may load: the layers (of ours) and the heavy libraries
THIRD_PARTY = ("torch", "gradio", "triton", "transformers", "plotly")
RUNTIME = {
    # layer: (modules to import, libraries it may load)
    "leaves": (["ruozhi_ui.errors", "ruozhi_ui.i18n", "ruozhi_ui.events", "ruozhi_ui.specs",
                "ruozhi_ui.capabilities", "ruozhi_ui.anatomy", "ruozhi_ui.cache"], ()),
    "checkpoints": (["ruozhi_ui.checkpoints"], ()),
    "config": (["ruozhi_ui.config"], ()),
    "runs": (["ruozhi_ui.runs"], ()),
    "policy": (["ruozhi_ui.policy"], ()),
    "plots": (["ruozhi_ui.plots"], ("plotly",)),
    "data": (["ruozhi_ui.data", "ruozhi_ui.encoding", "ruozhi_ui.stats"], ("torch",)),
    "models": (["ruozhi_ui.models", "ruozhi_ui.preflight"], ("torch",)),
    "cuda": (["ruozhi_ui.cuda.graph_step", "ruozhi_ui.cuda.head_loss", "ruozhi_ui.cuda.layers",
              "ruozhi_ui.cuda.warm_up", "ruozhi_ui.cuda.qwen2_layer"], ("torch",)),
    "decoding": (["ruozhi_ui.decoding"], ("torch",)),
    "train": (["ruozhi_ui.train", "ruozhi_ui.train.precision", "ruozhi_ui.train.checkpointing"], ("torch",)),
    "generation": (["ruozhi_ui.generation"], ("torch",)),
    "worker_protocol": (["ruozhi_ui.worker_protocol"], ()),
    "zerogpu": (["ruozhi_ui.zerogpu"], ()),
    "launch": (["ruozhi_ui.launcher"], ()),
    "jobs": (["ruozhi_ui.jobs"], ()),
    "cli": (["ruozhi_ui.cli"], ()),
    "ui.context": (["ruozhi_ui.ui.context"], ("gradio",)),
}
PROBE = ("import importlib, json, sys\n"
         "for name in sys.argv[1:]:\n"
         "    importlib.import_module(name)\n"
         "print(json.dumps(sorted(sys.modules)))\n")


def modules_loaded_by(modules: list[str]) -> list[str]:
    """Every module a fresh interpreter holds after importing `modules`."""
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """layer -> every module loaded by importing it in a fresh interpreter (four interpreters at a time)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = pool.map(modules_loaded_by, [modules for modules, _ in RUNTIME.values()])
        return dict(zip(RUNTIME, found))


@pytest.mark.parametrize("layer", list(RUNTIME))
def test_importing_a_layer_loads_only_the_layers_below_it(loaded, layer):
    source = layer_of(RUNTIME[layer][0][0])
    ours = {layer_of(m) for m in loaded[layer] if m.startswith("ruozhi_ui.")}
    above = sorted(name for name in ours if name != source and LAYERS[name][0] >= LAYERS[source][0])
    assert above == []


@pytest.mark.parametrize("layer", list(RUNTIME))
def test_importing_a_layer_loads_only_the_libraries_it_is_allowed(loaded, layer):
    libraries = {m for m in loaded[layer] if m in THIRD_PARTY}
    assert sorted(libraries - set(RUNTIME[layer][1])) == []


def test_the_cuda_speed_code_imports_without_the_training_loop(loaded):
    # `import ruozhi_ui.cuda.head_loss` used to load train/ (and with it ten engine modules)
    assert [m for m in loaded["cuda"] if m.startswith(("ruozhi_ui.train", "ruozhi_ui.decoding"))] == []


@pytest.mark.xfail(strict=True, reason="ui/compare_tab.py imports generation (torch) at module level; "
                                       "the shell loads it with the tab until that import moves")
def test_the_app_shell_imports_without_torch():
    assert "torch" not in modules_loaded_by(["ruozhi_ui.ui.shell"])
