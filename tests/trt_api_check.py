"""Check that Python code only uses TensorRT API names present in every supported TensorRT version.

We support TensorRT 10.3 (Jetson JetPack 6) and 11.x; neither can be installed on our development machines, so this
module checks source files statically against name tables extracted from the real bindings wheels by
`tools/trt_names.py` (committed in tests/data/tensorrt_names/, one file per version; findings in its README.md).

What is checked (`problems_in_file`):
- Every name in an attribute chain rooted at the `tensorrt` module (`trt.BuilderFlag.FP16`, `from tensorrt import
  Builder`, `getattr(trt, "X")`, keyword names of calls such as `trt.Logger(min_severity=...)`) must be a TensorRT
  name in every table. This is strict: a name that no table knows is reported too.
- Any other attribute access (`config.int8_calibrator`, `context.execute_async_v2(...)`) is checked when the name
  looks like TensorRT API: it is on `KNOWN_TENSORRT_NAMES`, or it is in some table and distinctive enough not to be
  an everyday Python name (`write`, `offset` or `mask` are in the tables as keyword names; single lower-case words
  are skipped). Without type information this is the practical way to catch method calls on engines/contexts.
- `Enum.MEMBER` pairs in `QUALIFIED_REMOVED_IN_11` (e.g. `BuilderFlag.INT8`) whose member name lives on elsewhere
  (`DataType.INT8`), so that a flat name table cannot see the removal.
A name counts as present on weak evidence too (only as the tail of a longer string, see tools/trt_names.py).

Opt-out: code that deliberately uses a one-version name behind a version check marks the line with
`# trt-version-guarded` (a reason after a colon is welcome). `hasattr(x, "NAME")` and 3-argument
`getattr(x, "NAME", default)` are version probes and are never checked.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

TABLE_DIR = Path(__file__).resolve().parent / "data" / "tensorrt_names"
GUARD_MARKER = "trt-version-guarded"
TENSORRT_MODULE = "tensorrt"

# TensorRT API names that no supported version has any more (so no table knows them) or whose name survives only
# on another class, mostly removed in 10.0. Listed so that calls on engines/contexts/configs, which are not visibly
# rooted at the module, are still caught.
KNOWN_TENSORRT_NAMES: dict[str, str] = {
    "execute_async_v2": "IExecutionContext.execute_async_v2 removed in 10.0: use set_tensor_address + execute_async_v3",
    "execute_async": "IExecutionContext.execute_async removed in 10.0; the name survives only as a plugin method",
    "get_binding_shape": "binding API removed in 10.0: use get_tensor_shape / context.get_tensor_shape",
    "set_binding_shape": "binding API removed in 10.0: use context.set_input_shape",
    "get_binding_index": "binding API removed in 10.0: use tensor names",
    "get_binding_name": "binding API removed in 10.0: use get_tensor_name",
    "get_binding_dtype": "binding API removed in 10.0: use get_tensor_dtype",
    "binding_is_input": "binding API removed in 10.0: use get_tensor_mode",
    "get_binding_vectorized_dim": "binding API removed in 10.0",
    "get_profile_shape": "removed in 10.0: use get_tensor_profile_shape",
    "num_bindings": "removed in 10.0: use num_io_tensors",
    "build_engine": "removed in 10.0: use build_serialized_network",
    "build_cuda_engine": "removed in 8.0: use build_serialized_network",
    "max_workspace_size": "removed in 10.0: use set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)",
    "max_batch_size": "IBuilder.max_batch_size removed in 10.0 (implicit batch); the name survives as a plugin arg",
    "set_dynamic_range": "implicit INT8 (deprecated 10.1, removed 11.0): use Q/DQ nodes in the ONNX file",
    "int8_calibrator": "implicit INT8 calibration (deprecated 10.1, removed 11.0): use Q/DQ nodes",
    "strict_type_constraints": "removed in 8.x: use strongly typed networks",
}

# Enum members removed in 11.0 whose member NAME still exists in 11.x on another enum, so the flat tables show the
# name in both versions. Evidence (tools/trt_names.py grep): the member's docstring is in the 10.3 .so and not in the
# 11.4.0.106 .so; the same docstring is how the 10.3 string layout shows the member right after "BuilderFlag".
QUALIFIED_REMOVED_IN_11: dict[str, str] = {
    "BuilderFlag.FP16": "docstring 'Enable FP16 layer selection' only in 10.3 (FP16 itself is also gone from 11.x)",
    "BuilderFlag.BF16": "docstring 'Enable BF16 layer selection' only in 10.3; BF16 lives on as DataType.BF16",
    "BuilderFlag.INT8": "docstring 'Enable Int8 layer selection' only in 10.3; INT8 lives on as DataType.INT8",
    "BuilderFlag.FP8": "docstring 'Enable plugins with FP8 input/output' only in 10.3; FP8 lives on as DataType.FP8",
    "BuilderFlag.INT4": "docstring 'Enable plugins with INT4 input/output' only in 10.3; DataType.INT4 remains",
}

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Distinctive: snake_case with an inner underscore, a digit, CamelCase, or an UPPER_CASE enum member of 3+ chars.
DISTINCTIVE = re.compile(r"[A-Za-z][A-Za-z0-9]*_[A-Za-z0-9_]*|.*\d.*|[A-Z]+[a-z]+[A-Z][A-Za-z0-9]*|[A-Z][A-Z0-9_]{2,}")


@dataclass(frozen=True)
class VersionTable:
    """Names registered by one TensorRT version's Python bindings (see tools/trt_names.py for the format)."""

    version: str
    names: frozenset[str]
    hosts: frozenset[str]
    tails: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # identifier → a longer string it is the tail of: proper tails of names, tails (or the whole) of hosts
        tails: dict[str, str] = {}
        for text, first in [(n, 1) for n in sorted(self.names)] + [(h, 0) for h in sorted(self.hosts)]:
            for start in range(first, len(text)):
                if IDENTIFIER.fullmatch(text[start:]):
                    tails.setdefault(text[start:], text)
        object.__setattr__(self, "tails", tails)

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def evidence(self, name: str) -> str | None:
        """How the table knows `name` (registered, or weak tail-merge evidence), or None when it does not."""
        if name in self.names:
            return "registered"
        host = self.tails.get(name)
        if host is None:
            return None
        if host in self.names:
            return f"tail-merged into the registered name {host!r} (weak evidence)"
        return f"tail-merged into a longer string ending in {host!r} (weak evidence)"

    def has(self, name: str) -> bool:
        return name in self.names or name in self.tails


def parse_table(text: str, version: str) -> VersionTable:
    names, hosts = set(), set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        (hosts if line.startswith("~") else names).add(line.lstrip("~"))
    return VersionTable(version=version, names=frozenset(names), hosts=frozenset(hosts))


@cache
def load_tables(table_dir: Path = TABLE_DIR) -> tuple[VersionTable, ...]:
    """All `tensorrt-<version>.txt` tables of a folder, oldest version first."""
    tables = []
    for path in table_dir.glob("tensorrt-*.txt"):
        version = path.stem.removeprefix("tensorrt-")
        tables.append(parse_table(path.read_text(encoding="ascii"), version))
    if not tables:
        raise FileNotFoundError(
            f"{table_dir}: no tensorrt-<version>.txt name tables (make them with tools/trt_names.py)"
        )
    return tuple(sorted(tables, key=lambda t: tuple(int(p) for p in re.findall(r"\d+", t.version))))


@dataclass(frozen=True)
class Use:
    """One TensorRT-looking name used in a source file."""

    name: str  # identifier, or "Enum.MEMBER" for qualified checks
    line: int
    end_line: int
    strict: bool  # rooted at the tensorrt module: must be known to every table


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name}: {self.message}"


def _dotted(node: ast.expr) -> str | None:
    """`trt` → "trt", `self._trt` → "self._trt", anything else → None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _string_arg(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_import_module_tensorrt(node: ast.expr) -> bool:
    """`importlib.import_module("tensorrt")` or `import_module("tensorrt")`."""
    if not isinstance(node, ast.Call) or not node.args or _string_arg(node.args[0]) != TENSORRT_MODULE:
        return False
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


class _UseCollector:
    """Finds the tensorrt module aliases of one file and every TensorRT-looking name it uses."""

    def __init__(self, tree: ast.Module, tables: tuple[VersionTable, ...]):
        self.tree = tree
        self.tables = tables
        self.uses: list[Use] = []
        # local dotted name → path inside the tensorrt module ("" = the module itself)
        self.aliases: dict[str, tuple[str, ...]] = {}
        self._find_aliases()

    def looks_like_tensorrt(self, name: str) -> bool:
        if name in KNOWN_TENSORRT_NAMES:
            return True
        if name.startswith("_") or not DISTINCTIVE.fullmatch(name):
            return False
        # Registered somewhere, not merely a tail: `args.fp16` must not count because of `platform_has_fast_fp16`.
        return any(name in t.names for t in self.tables)

    def _add(self, name: str, node: ast.AST, strict: bool) -> None:
        end = getattr(node, "end_lineno", None) or node.lineno
        self.uses.append(Use(name, node.lineno, end, strict))

    def _find_aliases(self) -> None:
        imports_tensorrt = False
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == TENSORRT_MODULE or alias.name.startswith(TENSORRT_MODULE + "."):
                        imports_tensorrt = True
                        inner = tuple(alias.name.split(".")[1:])
                        for part in inner:
                            self._add(part, node, strict=True)
                        if alias.asname:
                            self.aliases[alias.asname] = inner
                        else:
                            self.aliases[TENSORRT_MODULE] = ()  # `import tensorrt.plugin` binds `tensorrt`
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == TENSORRT_MODULE or node.module.startswith(TENSORRT_MODULE + "."):
                    imports_tensorrt = True
                    inner = tuple(node.module.split(".")[1:])
                    for part in inner:
                        self._add(part, node, strict=True)
                    for alias in node.names:
                        if alias.name != "*":
                            self._add(alias.name, node, strict=True)
                            self.aliases[alias.asname or alias.name] = (*inner, alias.name)
            elif isinstance(node, ast.Assign) and _is_import_module_tensorrt(node.value):
                imports_tensorrt = True
                for target in node.targets:
                    if (dotted := _dotted(target)) is not None:
                        self.aliases[dotted] = ()
        if imports_tensorrt:
            # Lazy-import helpers (`trt = _import_tensorrt()`) hide the module; the conventional names still mean it.
            self.aliases.setdefault("trt", ())
            self.aliases.setdefault(TENSORRT_MODULE, ())
        # `self._trt = trt`, `flags = trt.BuilderFlag`: new names for (parts of) the module, to a fixpoint.
        changed = True
        while changed:
            changed = False
            for node in ast.walk(self.tree):
                if isinstance(node, ast.Assign):
                    path = self.resolve(node.value)
                    if path is None:
                        continue
                    for target in node.targets:
                        dotted = _dotted(target)
                        if dotted is not None and dotted not in self.aliases:
                            self.aliases[dotted] = path
                            changed = True

    def resolve(self, node: ast.expr) -> tuple[str, ...] | None:
        """Path inside tensorrt of a pure Name/Attribute chain rooted at an alias, else None."""
        dotted = _dotted(node)
        if dotted is None:
            return None
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            root = ".".join(parts[:cut])
            if root in self.aliases:
                return (*self.aliases[root], *parts[cut:])
        return None

    def collect(self) -> list[Use]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Attribute):
                self._attribute(node)
            elif isinstance(node, ast.Call):
                self._call(node)
        return self.uses

    def _attribute(self, node: ast.Attribute) -> None:
        base_path = self.resolve(node.value)
        if base_path is not None:
            if any(part.startswith("__") for part in base_path):
                return  # `trt.__version__.split`: past a dunder it is plain Python
            if node.attr.startswith("__") and node.attr != "__version__":
                return
            self._add(node.attr, node, strict=True)
            if base_path and base_path[-1][:1].isupper():
                self._add(f"{base_path[-1]}.{node.attr}", node, strict=True)
            return
        if _dotted(node) is not None and _dotted(node) in self.aliases:
            return  # `self._trt` itself is our attribute, not TensorRT's
        if self.looks_like_tensorrt(node.attr):
            self._add(node.attr, node, strict=False)
        parent = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
        if parent is not None and f"{parent}.{node.attr}" in QUALIFIED_REMOVED_IN_11:
            self._add(f"{parent}.{node.attr}", node, strict=False)

    def _call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) == 2:
            name = _string_arg(node.args[1])
            if name is None:
                return
            base_path = self.resolve(node.args[0])
            if base_path is not None:
                self._add(name, node, strict=True)
                if base_path and base_path[-1][:1].isupper():
                    self._add(f"{base_path[-1]}.{name}", node, strict=True)
            elif self.looks_like_tensorrt(name):
                self._add(name, node, strict=False)
            return
        if self.resolve(func) is not None:
            for keyword in node.keywords:
                if keyword.arg is not None:
                    self._add(keyword.arg, keyword, strict=True)


def _collect(source: str, path: str, tables: tuple[VersionTable, ...]) -> list[Use]:
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as exc:
        raise SyntaxError(f"{path}: cannot parse: {exc}") from exc
    return _UseCollector(tree, tables).collect()


def trt_names_used(source_path: str | Path, tables: tuple[VersionTable, ...] | None = None) -> set[tuple[str, int]]:
    """(name, line) of every TensorRT-looking name used in a Python file ("Enum.MEMBER" for qualified names)."""
    path = Path(source_path)
    return {
        (use.name, use.line) for use in _collect(path.read_text(encoding="utf-8"), str(path), tables or load_tables())
    }


def guarded_lines(source: str) -> set[int]:
    """Lines whose comment carries the opt-out marker."""
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and GUARD_MARKER in token.string:
            lines.add(token.start[0])
    return lines


def _judge(use: Use, tables: tuple[VersionTable, ...]) -> str | None:
    """Why a use is a problem, or None when every version has it."""
    if "." in use.name:
        reason = QUALIFIED_REMOVED_IN_11.get(use.name)
        if reason is None:
            return None
        missing = [t.version for t in tables if t.major >= 11]
        present = [t.version for t in tables if t.major < 11]
        return f"only in TensorRT {', '.join(present)}, missing in {', '.join(missing)} ({reason})"
    present = [t.version for t in tables if t.has(use.name)]
    missing = [t.version for t in tables if not t.has(use.name)]
    note = KNOWN_TENSORRT_NAMES.get(use.name)
    if not missing:
        if note is None:
            return None
        return f"in every table on some class, but this is the removed API: {note}"
    if not present:
        if not use.strict and note is None:
            return None
        return f"not a TensorRT name in {', '.join(missing)}" + (f" ({note})" if note else "")
    return f"only in TensorRT {', '.join(present)}, missing in {', '.join(missing)}" + (f" ({note})" if note else "")


def problems_in_source(
    source: str, path: str = "<source>", tables: tuple[VersionTable, ...] | None = None
) -> list[Problem]:
    """Every TensorRT name use that some supported version lacks, except on `# trt-version-guarded` lines."""
    tables = tables or load_tables()
    guarded = guarded_lines(source)
    problems = set()
    for use in _collect(source, path, tables):
        if guarded.intersection(range(use.line, use.end_line + 1)):
            continue
        message = _judge(use, tables)
        if message is not None:
            problems.add(Problem(path, use.line, use.name, message))
    return sorted(problems, key=lambda p: (p.line, p.name))


def problems_in_file(source_path: str | Path, tables: tuple[VersionTable, ...] | None = None) -> list[Problem]:
    path = Path(source_path)
    return problems_in_source(path.read_text(encoding="utf-8"), str(path), tables)


def explain(names: Iterable[str], tables: tuple[VersionTable, ...]) -> Iterator[str]:
    for name in names:
        for table in tables:
            yield f"{name}: TensorRT {table.version}: {table.evidence(name) or 'absent'}"
        if name in KNOWN_TENSORRT_NAMES:
            yield f"{name}: known removed API: {KNOWN_TENSORRT_NAMES[name]}"
        if name in QUALIFIED_REMOVED_IN_11:
            yield f"{name}: removed in 11.0: {QUALIFIED_REMOVED_IN_11[name]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python tests/trt_api_check.py export/build_engine.py runtime/trt_backend.py
  python tests/trt_api_check.py --explain FP16 INT8 execute_async_v3 BuilderFlag.INT8
exit status: 0 = every TensorRT name exists in all tables, 1 = problems were printed, 2 = bad input.
""",
    )
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE", help="Python files to check")
    parser.add_argument("--explain", nargs="+", metavar="NAME", default=[], help="show each table's evidence")
    parser.add_argument("--tables", type=Path, default=TABLE_DIR, help=f"name-table folder (default {TABLE_DIR})")
    args = parser.parse_args(argv)
    try:
        tables = load_tables(args.tables)
        for line in explain(args.explain, tables):
            print(line)
        found = False
        for path in args.files:
            for problem in problems_in_file(path, tables):
                print(problem)
                found = True
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
