"""Extract the Python API name table of a TensorRT bindings wheel, without importing TensorRT.

TensorRT cannot be installed on our development machines, yet our code must only use TensorRT Python names that
exist in both TensorRT 10.3 (Jetson JetPack 6) and 11.x. The `tensorrt-cu12-bindings` wheels download from PyPI
anywhere; their `tensorrt.so` is a pybind11 module, and pybind11 registers every class, function, property, enum
member and keyword-argument name from a NUL-terminated C string literal. Those literals live in the `.rodata`
section, so the set of registered names can be read from the file. `tests/trt_api_check.py` checks our source
files against the tables this script writes (see tests/data/tensorrt_names/README.md for what the tables found).

Faithfulness rules (why the table is not simply "every identifier-looking run of bytes"):
- Only a WHOLE NUL-terminated `.rodata` string that is an identifier counts as a registered name ("strong").
  Identifier runs inside longer strings are docstring/signature words: TensorRT 11.4 still mentions "FP16" in
  docstrings ("``1 << BuilderFlag.FP16``", "bound to FP16") although `BuilderFlag.FP16` was removed.
- The linker merges a string into the tail of a longer one ("INT8" is stored only as the tail of "UINT8",
  "Logger" only as the tail of a mangled "...8PyLogger"). So every string that ends in an identifier run but is
  not itself a plausible Python name (C++ mangled names, docstrings, signatures) is kept as a tail-merge host,
  written with a leading "~". A name found only as the tail of another entry is present as WEAK evidence.
- Names the wheel's pure-Python `__init__.py` adds to the module (`volume`, `nptype`, `__version__`,
  `DataType.itemsize`, ...) are read from it with `ast` and count as strong.

Table format (one entry per line, sorted; lines starting with "#" are comments):
    NAME        a registered name (strong evidence)
    ~HOST       a tail-merge host only; names that end it are weak evidence
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
TRAILING_IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*$")
# Itanium C++ ABI mangled names (typeinfo names such as "N8nvinfer17ILoggerE", function types such as
# "FvRN8nvinfer115IInt8CalibratorEN8pybind116bufferEE"): identifiers to a regex, but never Python names.
# The length-prefixed-component and trailing-"E" tests keep real names such as "FP16", "FAILED" or "E8M0" out.
MANGLED = re.compile(
    r"(?:_?Z[NL]?|N|St|P*F)[A-Za-z0-9_]*\d+[A-Za-z_][A-Za-z0-9_]*E"  # nested names, e.g. N8nvinfer17ILoggerE
    r"|P*F[a-z][A-Za-z0-9_]*E"  # function types of builtins, e.g. FivE, PFbPvPKcE
    r"|St\d+[A-Za-z_][A-Za-z0-9_]*"  # std:: names, e.g. St19bad_optional_access
)
# Lines longer than this are not API names (the longest real TensorRT name is ~55 characters); this also keeps
# each table file small.
MAX_NAME_LENGTH = 200


class WheelError(ValueError):
    """A wheel that is not a TensorRT bindings wheel, or whose extension module cannot be read."""


@dataclass
class NameTable:
    """Registered names of one TensorRT version, plus the tail-merge hosts needed to judge weak evidence."""

    version: str
    names: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)
    sources: list[str] = field(default_factory=list)

    def merge(self, other: NameTable) -> None:
        self.names |= other.names
        self.hosts |= other.hosts - self.names
        self.sources += other.sources


def elf_sections(blob: bytes, where: str) -> dict[str, bytes]:
    """Section name → contents of a 64-bit little-endian ELF file (the Linux x86_64/aarch64 wheels)."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2 or blob[5] != 1:
        raise WheelError(f"{where}: not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    strtab_offset = headers[shstrndx][4]
    sections = {}
    for name_offset, sh_type, _flags, _addr, offset, size in headers:
        end = blob.index(b"\0", strtab_offset + name_offset)
        name = blob[strtab_offset + name_offset : end].decode("ascii", "replace")
        if sh_type != 8:  # SHT_NOBITS (.bss) has no bytes in the file
            sections[name] = blob[offset : offset + size]
    return sections


def rodata_strings(so_blob: bytes, where: str) -> set[bytes]:
    """All NUL-terminated byte strings of the read-only data sections (where pybind11 name literals live)."""
    sections = elf_sections(so_blob, where)
    rodata = [data for name, data in sections.items() if name == ".rodata" or name.startswith(".rodata.")]
    if not rodata:
        raise WheelError(f"{where}: no .rodata section")
    strings: set[bytes] = set()
    for data in rodata:
        strings.update(data.split(b"\0"))
    return strings


def table_from_strings(strings: set[bytes], version: str, source: str) -> NameTable:
    """Classify raw strings into registered names (whole identifier strings) and tail-merge hosts."""
    table = NameTable(version=version, sources=[source])
    for raw in strings:
        tail = TRAILING_IDENTIFIER.search(raw)
        if tail is None:
            continue
        if IDENTIFIER.fullmatch(raw):
            text = raw.decode("ascii")
            if len(text) <= MAX_NAME_LENGTH and not MANGLED.fullmatch(text):
                table.names.add(text)
                continue
        # Not a name itself: keep the trailing identifier run, the only part a shorter string can be merged into.
        host = tail.group().decode("ascii")
        if len(host) > MAX_NAME_LENGTH:
            host = host[-MAX_NAME_LENGTH:].lstrip("0123456789")
        if host:
            table.hosts.add(host)
    table.hosts -= table.names
    return table


def python_level_names(init_source: str) -> set[str]:
    """Public names the wheel's pure-Python `__init__.py` adds to the `tensorrt` module or to its classes."""
    names = {"__version__"} if "__version__" in init_source else set()
    for node in ast.parse(init_source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            names.add(node.name)
    for node in ast.walk(ast.parse(init_source)):
        # `DataType.itemsize = property(...)`, `Logger.Severity = ILogger.Severity`: attributes added to classes.
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and not target.attr.startswith("__"):
                    names.add(target.attr)
    return names


def wheel_version(archive: zipfile.ZipFile, wheel: Path) -> str:
    for member in archive.namelist():
        if member.endswith(".dist-info/METADATA"):
            match = re.search(r"^Version: *(\S+)", archive.read(member).decode("utf-8", "replace"), re.M)
            if match:
                return match.group(1)
    raise WheelError(f"{wheel}: no Version in the wheel's .dist-info/METADATA")


def open_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise WheelError(f"{wheel}: cannot open as a wheel (zip): {exc}") from exc


def extension_module(archive: zipfile.ZipFile, wheel: Path) -> str:
    """Path inside the wheel of its one `tensorrt*.so` (the pybind11 module)."""
    modules = [m for m in archive.namelist() if re.search(r"(^|/)tensorrt[^/]*\.so$", m)]
    if len(modules) != 1:
        raise WheelError(f"{wheel}: expected one tensorrt*.so inside, found {modules or 'none'}")
    return modules[0]


def extract_wheel(wheel: Path) -> NameTable:
    """Read one TensorRT bindings wheel (zip) and return its name table."""
    with open_wheel(wheel) as archive:
        version = wheel_version(archive, wheel)
        module = extension_module(archive, wheel)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        where = f"{wheel.name} (sha256 {digest}):{module}"
        table = table_from_strings(rodata_strings(archive.read(module), where), version, where)
        package = module.rsplit("/", 1)[0]
        init_name = f"{package}/__init__.py"
        if init_name in archive.namelist():
            table.names |= python_level_names(archive.read(init_name).decode("utf-8"))
            table.sources.append(f"{wheel.name}:{init_name}")
        # Subpackages (`tensorrt.plugin` in the 11.4 wheel) are attributes of the module once imported.
        inside = [m[len(package) + 1 :] for m in archive.namelist() if m.startswith(package + "/")]
        table.names |= {m.split("/")[0] for m in inside if "/" in m}
    table.hosts -= table.names
    return table


def render_table(table: NameTable) -> str:
    lines = [
        f"# TensorRT {table.version} Python API names, extracted by tools/trt_names.py from:",
        *[f"#   {source}" for source in table.sources],
        "# NAME = whole NUL-terminated .rodata string (strong); ~HOST = tail-merge host only (names ending it: weak).",
    ]
    lines += sorted(table.names)
    lines += sorted("~" + host for host in table.hosts)
    return "\n".join(lines) + "\n"


def write_text_atomically(path: Path, text: str) -> None:
    """Temp file + rename, so an interrupted run never leaves a half-written table behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="ascii") as out:
            out.write(text)
        os.chmod(temp, 0o644)  # mkstemp creates 0600; the tables are ordinary committed files
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def extract(wheels: list[Path], out_dir: Path) -> list[Path]:
    """Write `tensorrt-<version>.txt` per version; wheels of the same version (cp311/cp312) are merged."""
    tables: dict[str, NameTable] = {}
    for wheel in wheels:
        table = extract_wheel(wheel)
        if table.version in tables:
            known = tables[table.version]
            if (known.names, known.hosts) != (table.names, table.hosts):
                extra = sorted(table.names ^ known.names)
                print(
                    f"note: {wheel.name} differs from another {table.version} wheel in {len(extra)} names "
                    f"(e.g. {extra[:5]}); writing the union",
                    file=sys.stderr,
                )
            known.merge(table)
        else:
            tables[table.version] = table
    written = []
    for version, table in sorted(tables.items()):
        path = out_dir / f"tensorrt-{version}.txt"
        write_text_atomically(path, render_table(table))
        print(f"{path}: {len(table.names)} names, {len(table.hosts)} tail-merge hosts")
        written.append(path)
    return written


def grep(wheel: Path, text: str, width: int = 70) -> list[str]:
    """Every .rodata string of the wheel's tensorrt*.so containing `text`, clipped around the hit (for evidence)."""
    with open_wheel(wheel) as archive:
        module = extension_module(archive, wheel)
        strings = rodata_strings(archive.read(module), f"{wheel.name}:{module}")
    hits = []
    needle = text.encode()
    for raw in sorted(strings):
        start = raw.find(needle)
        if start >= 0:
            kind = "whole string" if raw == needle else ("tail" if raw.endswith(needle) else "inside")
            clip = raw[max(0, start - width) : start + len(needle) + width].decode("utf-8", "replace")
            hits.append(f"[{kind}] {clip!r}")
    return hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  pip download --no-deps -d /tmp/trt --only-binary=:all: --python-version 3.11 \\
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 tensorrt-cu12-bindings==10.3.0
  (same for tensorrt-cu12-bindings==11.4.0.106; do not install them)
  python tools/trt_names.py extract /tmp/trt/*.whl --out tests/data/tensorrt_names/
  python tools/trt_names.py grep /tmp/trt/tensorrt_cu12_bindings-10.3.0-*.whl "Enable Int8 layer selection"
""",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    extract_cmd = commands.add_parser("extract", help="write one name table per TensorRT version")
    extract_cmd.add_argument("wheels", nargs="+", type=Path, metavar="WHEEL")
    extract_cmd.add_argument("--out", type=Path, required=True, help="folder for tensorrt-<version>.txt")
    grep_cmd = commands.add_parser("grep", help="show the .rodata strings containing TEXT (docstring evidence)")
    grep_cmd.add_argument("wheel", type=Path, metavar="WHEEL")
    grep_cmd.add_argument("text", metavar="TEXT")
    args = parser.parse_args(argv)
    try:
        if args.command == "extract":
            extract(args.wheels, args.out)
        else:
            hits = grep(args.wheel, args.text)
            print("\n".join(hits) if hits else f"{args.text!r}: not in {args.wheel.name}")
    except (WheelError, OSError, zipfile.BadZipFile) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
