"""No module-level mutable state outside an explicit allow-list; typed choices cover the strings in use.

State that lives as long as the process and is shared by every app and run in it is a trap (two apps in
one test process, a second run after a first). What is left below is process-wide by nature (a GPU capture
is a property of the process) or has a named owner it is waiting to move to. Module-level constants
(UPPER_CASE names, frozen dataclasses, compiled patterns, literal tables) are fine, and never mutated.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ruozhi_ui"

# (module path, name) -> why it stays module-level
ALLOWED = {
    ("capabilities.py", "CAPTURE_LOCK"): "one CUDA graph capture at a time in the process: capture is process-wide",
    ("models.py", "_demo_lock"): "guards building the demo model's folder on disk, a resource of the machine",
    ("cuda/layers.py", "compiled_layer_forward"): "torch.compile's code is per process; a second run reuses it",
    ("cuda/warm_up.py", "_warm_up"): "CUDA-only: the kernel warm-up thread of the run being set up; moves into "
                                      "train/run.Run once a GPU can confirm the move",
    ("cuda/warm_up.py", "warm_up_seconds"): "CUDA-only: what the last warm-up took (tests/test_gpu.py reads it); "
                                            "moves with _warm_up",
    ("decoding/engine.py", "WARM_UP"): "the decode warm-up builder (its thread ends when its queue is empty), shared "
                                       "so base and tuned build shortest-first together; moves into generation's "
                                       "ModelCache (AppContext) once a GPU can confirm test_gpu_decode",
    ("preflight.py", "read_config"): "a bounded memo (8) of config.json reads; the preflight owner may move it",
    ("preflight.py", "model_shape"): "a bounded memo (8), with read_config",
    ("ui/compare_tab.py", "_active"): "each session's running generations; the Compare tab's owner moves it into "
                                      "the app's context",
    ("ui/compare_tab.py", "_active_lock"): "guards _active",
    ("zerogpu/compare.py", "_lease_models"): "the lease worker's model cache: ZeroGPU keeps the forked worker process "
                                             "between calls, so its loaded models are the process's; never built in "
                                             "the app process",
    ("zerogpu/standin.py", "_ORIGINAL"): "the stand-in lease runner's saved torch.cuda functions while it emulates what "
                                         "`spaces` patches in the main process (tests only)",
    ("bounds.py", "_bounds"): "the process's dataset size bounds, set by build_app from the policy so that the "
                              "engine's own load_source (a run started without a Data-tab load) obeys them too; "
                              "to become a load_source argument the run carries",
}
STATEFUL_MODULES = ("threading.", "queue.", "collections.")
STATEFUL_BUILTINS = ("list", "set", "bytearray", "OrderedDict", "defaultdict", "deque", "Counter")
MUTATORS = ("append", "extend", "insert", "pop", "popitem", "remove", "clear", "update", "setdefault", "add",
            "discard", "put")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def frozen_dataclasses() -> set[str]:
    names = set()
    for _, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any("frozen=True" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def module_state() -> dict[tuple[str, str], str]:
    """(module, name) -> what it is, for every module-level binding that holds state."""
    frozen, found = frozen_dataclasses(), {}
    for module, tree in modules():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                if any("cache" in ast.unparse(d) for d in node.decorator_list):
                    found[(module, node.name)] = "a memoising decorator"
                continue
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            for target in targets:
                name = ast.unparse(target)
                if name == "__all__":
                    continue
                empty = isinstance(value, (ast.List, ast.Dict, ast.Set)) and not (
                    getattr(value, "elts", None) or getattr(value, "keys", None))
                if empty or (isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp))
                             and not name.isupper()):
                    found[(module, name)] = "a mutable container"
                elif isinstance(value, ast.Call):
                    called = ast.unparse(value.func)
                    # dict(...) is how a constant table is written here (LAUNCH_KWARGS); an instance of one of
                    # our classes is state unless the class is a frozen dataclass
                    if called.startswith(STATEFUL_MODULES) or called in STATEFUL_BUILTINS or (
                            called[:1].isupper() and called not in frozen and "." not in called):
                        found[(module, name)] = f"{called}(...)"
    for module, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                for name in node.names:
                    found[(module, name)] = "rebound through `global`"
    return found


def test_no_module_level_mutable_state_outside_the_allow_list():
    assert sorted(set(module_state()) - set(ALLOWED)) == []


def test_the_allow_list_names_only_state_that_is_still_there():
    assert sorted(set(ALLOWED) - set(module_state())) == []


def test_module_level_constants_are_never_mutated():
    constants = set()
    for module, tree in modules():
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name) and target.id.isupper():
                        constants.add(target.id)
    mutated = []
    for module, tree in modules():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in constants
                    and (module, node.func.value.id) not in ALLOWED):
                mutated.append(f"{module}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) \
                            and target.value.id in constants:
                        mutated.append(f"{module}:{node.lineno} {ast.unparse(target)}")
    assert mutated == []


# ---------------------------------------------------------------- typed choices

def test_the_event_kinds_are_the_event_classes():
    from ruozhi_ui.events import EVENT_TYPES, EventKind

    assert typing.get_args(EventKind) == tuple(EVENT_TYPES)


def test_a_job_ends_with_a_status_a_run_record_also_has():
    from ruozhi_ui.events import EndStatus
    from ruozhi_ui.jobs import ACTIVE, JobStatus
    from ruozhi_ui.runs import RunStatus

    ends = (*typing.get_args(EndStatus), "failed")
    assert set(ACTIVE) | set(ends) | {"idle"} == set(typing.get_args(JobStatus))
    assert set(ends) | {"running", "incomplete"} == set(typing.get_args(RunStatus))


def test_every_precision_the_engine_chooses_is_a_typed_code():
    import torch

    from ruozhi_ui.config import ModelConfig, TrainConfig
    from ruozhi_ui.events import PrecisionCode
    from ruozhi_ui.train.precision import choose_precision

    prec = choose_precision(TrainConfig(model=ModelConfig(spec="demo")), torch.device("cpu"))
    assert prec.code in typing.get_args(PrecisionCode)
