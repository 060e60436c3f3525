"""The modeling code saved along with a model, so that a folder written by `save_pretrained` loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` where only torch and transformers are
installed (no `modeling_ttt`).

How transformers loads remote code (`transformers.dynamic_module_utils`): `config.json`'s `auto_map` names
`"<file>.<Class>"`; the file and every file it imports relatively (found by a regex for `from .<name> import`, and
followed recursively) are copied from the folder into a *flat* package of the modules cache. So the copy here is
flat too: each module of this package needed by the model becomes one file of the folder, and its relative imports
are rewritten to name those files (`FLAT_NAMES`). The file names and the rewriting are derived at save time from the
package's own files (`remote_code_files`), never kept by hand, so the copy cannot drift from the package.

What the copy leaves out (`LEFT_OUT`): the C++ CPU kernels (`ops/cpu/`, which also need their `.cpp` file, which
transformers would not copy) and the Triton kernels (`ops/triton/`), this module and `model_card.py` (its template
is package data; `push_to_hub` of a model loaded from the copy says to install the package). A relative import of one of
them becomes `raise ImportError(...)` in the copy; the package imports them where an `ImportError` is handled
(`ops/__init__.py`), so the copy always runs the PyTorch ops: `ttt_impl="auto"` resolves to `"torch"` there, and
an explicit `"cpp"` / `"triton"` raises a `RuntimeError` that says to install `modeling-ttt`. The numbers are
those of the package with `ttt_impl="torch"`.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import tempfile

PACKAGE = "modeling_ttt"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
#: The modules `auto_map` names; their file names are kept, the other modules get a `ttt_` prefix.
ENTRY_MODULES = {f"{PACKAGE}.configuration_ttt": "configuration_ttt", f"{PACKAGE}.modeling_ttt": "modeling_ttt"}
#: Modules (and subpackages) not copied: the optional kernels, and the code that writes the copy.
LEFT_OUT = (f"{PACKAGE}.ops.cpu", f"{PACKAGE}.ops.triton", f"{PACKAGE}.hub", f"{PACKAGE}.model_card")
#: `auto_map` of a model's config.json.
AUTO_MAP = {
    "AutoConfig": "configuration_ttt.TTTConfig",
    "AutoModel": "modeling_ttt.TTTModel",
    "AutoModelForCausalLM": "modeling_ttt.TTTForCausalLM",
}
#: `auto_map` of a config saved on its own.
CONFIG_AUTO_MAP = {"AutoConfig": AUTO_MAP["AutoConfig"]}


def _is_left_out(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in LEFT_OUT)


def _module_file(module: str) -> str | None:
    """The source file of `module` ("modeling_ttt.ops.state"), or None when it is no module of the package."""
    parts = module.split(".")[1:]
    base = os.path.join(_PACKAGE_DIR, *parts)
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def flat_name(module: str) -> str:
    """The file name (without `.py`) of `module` in the flat copy: `modeling_ttt.ops.state` -> `ttt_ops_state`,
    `modeling_ttt.ops` (its `__init__.py`) -> `ttt_ops`; the entry modules keep their names."""
    if module in ENTRY_MODULES:
        return ENTRY_MODULES[module]
    return "ttt_" + "_".join(module.split(".")[1:])


def _relative_imports(module: str, tree: ast.Module) -> list[tuple[ast.ImportFrom, str, list[str]]]:
    """Each relative `from ... import` of `module` with the module it reads and the submodules it imports
    (`from . import cpu` imports the submodule `...ops.cpu`; `from .state import X` imports a name of `...state`)."""
    is_package = _module_file(module).endswith("__init__.py")
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):  # every depth: a lazy import inside a function is copied along too
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == PACKAGE for alias in node.names):
            raise ValueError(f"{module} imports {PACKAGE} absolutely (line {node.lineno}); the remote copy "
                             "can only follow relative imports.")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if node.module and node.module.split(".")[0] == PACKAGE:
                raise ValueError(f"{module} imports {node.module} absolutely (line {node.lineno}); the remote "
                                 "copy can only follow relative imports.")
            continue
        base = ".".join(package.split(".")[:len(package.split(".")) - (node.level - 1)])
        source = f"{base}.{node.module}" if node.module else base
        submodules = [f"{source}.{alias.name}" for alias in node.names if _module_file(f"{source}.{alias.name}")]
        found.append((node, source, submodules))
    return found


def _parse(module: str) -> tuple[str, ast.Module]:
    with open(_module_file(module), encoding="utf-8") as handle:
        text = handle.read()
    return text, ast.parse(text)


def _module_closure() -> list[str]:
    """The package modules the entry modules need, lazily or not, less `LEFT_OUT`."""
    needed, pending = [], list(ENTRY_MODULES)
    while pending:
        module = pending.pop(0)
        if module in needed:
            continue
        needed.append(module)
        for _, source, submodules in _relative_imports(module, _parse(module)[1]):
            for target in submodules or [source]:
                if not _is_left_out(target) and target not in needed:
                    pending.append(target)
    return needed


def _rewritten(module: str, text: str, tree: ast.Module) -> str:
    """`text` with each relative import rewritten for the flat copy (see the module docstring)."""
    replacements = []
    for node, source, submodules in _relative_imports(module, tree):
        names = ", ".join(alias.name + (f" as {alias.asname}" if alias.asname else "") for alias in node.names)
        targets = submodules or [source]
        if all(_is_left_out(target) for target in targets):
            statement = f"raise ImportError('{targets[0]} is not part of the remote-code copy (modeling_ttt.hub)')"
        elif any(_is_left_out(target) for target in targets):
            raise ValueError(f"{module} line {node.lineno}: one import mixes copied and left-out modules.")
        elif submodules:
            # `from . import x` gives transformers no `from .x import` to follow: it would not copy the file.
            raise ValueError(f"{module} line {node.lineno} imports a module object ({', '.join(submodules)}); the "
                             "remote copy needs `from .module import name` for the modules it ships.")
        else:
            statement = f"from .{flat_name(source)} import {names}"
        replacements.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, statement))
    lines = text.splitlines(keepends=True)
    for lineno, col, end_lineno, end_col, statement in sorted(replacements, reverse=True):
        first, last = lines[lineno - 1], lines[end_lineno - 1]
        lines[lineno - 1:end_lineno] = [first[:col] + statement + last[end_col:]]
    header = (f"# Generated by modeling_ttt.hub from {module} (modeling-ttt): a flat copy for transformers' "
              "remote code.\n")
    return header + "".join(lines)


def remote_code_files() -> dict[str, str]:
    """The flat copy of the modeling code: `{file name: source text}` (see the module docstring)."""
    modules = _module_closure()
    files = {}
    for module in modules:
        name = flat_name(module) + ".py"
        if name in files:
            raise ValueError(f"Two modules map to the flat file {name}.")
        files[name] = _rewritten(module, *_parse(module))
    return files


def write_remote_code(directory: str | os.PathLike) -> list[str]:
    """Write `remote_code_files()` into `directory` (created if needed); returns the paths written."""
    files = remote_code_files()
    os.makedirs(directory, exist_ok=True)
    _write(files, os.fspath(directory))
    return [os.path.join(directory, name) for name in files]


@contextlib.contextmanager
def _saving_with_auto_map(obj, config, auto_map: dict | None):
    """While saving: `config.auto_map` is `auto_map` (when given), and neither class counts as registered with
    `register_for_auto_class`, so that transformers' own `custom_object_save` (which copies the package's files as
    they are, relative imports into subpackages included, and fails on them) does not run."""
    classes = list(dict.fromkeys([type(obj), type(config)]))
    registered = {cls: cls.__dict__["_auto_class"] for cls in classes if "_auto_class" in cls.__dict__}
    had_auto_map, old_auto_map = hasattr(config, "auto_map"), getattr(config, "auto_map", None)
    try:
        for cls in classes:
            cls._auto_class = None
        if auto_map is not None:
            config.auto_map = dict(auto_map)
        yield
    finally:
        for cls in classes:
            if cls in registered:
                cls._auto_class = registered[cls]
            else:
                del cls._auto_class  # back to the inherited value
        if auto_map is not None:
            if had_auto_map:
                config.auto_map = old_auto_map
            else:
                delattr(config, "auto_map")


def _is_weight_file(name: str) -> bool:
    return name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))


def _move_into(staging: str, directory: str) -> None:
    """Move the saved files from `staging` to `directory`: a rename when `directory` is new; otherwise file by file
    (other files there, a tokenizer say, stay), after removing weight files of an earlier save that this one does
    not have (as `save_pretrained` does)."""
    if not os.path.exists(directory):
        os.rename(staging, directory)
        return
    new = set(os.listdir(staging))
    for name in os.listdir(directory):
        if _is_weight_file(name) and name not in new and os.path.isfile(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    for name in new:
        os.replace(os.path.join(staging, name), os.path.join(directory, name))


def save_pretrained_with_code(obj, base_save, save_directory, *args, with_code: bool = True,
                              auto_map: dict | None = None, **kwargs):
    """`base_save(save_directory, *args, **kwargs)` (transformers' `save_pretrained` of `obj`, a model or a
    config) plus, when `with_code`, the flat copy of the modeling code and `auto_map` (default `AUTO_MAP`) in
    config.json.

    The code is generated before anything is written, and the save goes to a staging folder next to
    `save_directory` that is moved into place only once complete: a failure leaves no partial folder (with
    `push_to_hub=True` the files are written in place, since the upload reads `save_directory`)."""
    files = remote_code_files() if with_code else {}  # first: a failure here leaves nothing behind
    config = getattr(obj, "config", obj)
    save_directory = os.fspath(save_directory)
    with _saving_with_auto_map(obj, config, (auto_map or AUTO_MAP) if with_code else None):
        if kwargs.get("push_to_hub", False):
            os.makedirs(save_directory, exist_ok=True)
            _write(files, save_directory)
            return base_save(save_directory, *args, **kwargs)
        if os.path.isfile(save_directory):
            return base_save(save_directory, *args, **kwargs)  # (transformers' own error)
        parent = os.path.dirname(os.path.abspath(save_directory))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".ttt-save-", dir=parent)
        try:
            result = base_save(staging, *args, **kwargs)
            _write(files, staging)
            _move_into(staging, save_directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return result


def _write(files: dict[str, str], directory: str) -> None:
    for name, text in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
            handle.write(text)


def save_with_code(model, save_directory: str | os.PathLike, **kwargs):
    """Save `model` (any TTT model or config) with its modeling code: `model.save_pretrained(save_directory,
    with_code=True, **kwargs)`."""
    return model.save_pretrained(save_directory, with_code=True, **kwargs)


__all__ = ["AUTO_MAP", "LEFT_OUT", "flat_name", "remote_code_files", "save_pretrained_with_code", "save_with_code",
           "write_remote_code"]
