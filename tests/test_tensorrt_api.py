"""Our TensorRT code must run on TensorRT 10.3 (Jetson JetPack 6) and 11.x: check it against both name tables.

TensorRT cannot be installed here, so these tests use the name tables extracted from the real wheels
(tests/data/tensorrt_names/, made by tools/trt_names.py) and the static checker in tests/trt_api_check.py.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # trt_api_check lives next to this file
import trt_api_check as check  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TENSORRT_SOURCES = ["export/build_engine.py", "export/tensorrt_build.py", "runtime/trt_build.py",
                    "runtime/trt_backend.py", "runtime/doctor.py"]


def load_trt_names_tool():
    spec = importlib.util.spec_from_file_location("trt_names", REPO / "tools" / "trt_names.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["trt_names"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tables():
    return check.load_tables()


@pytest.fixture(scope="module")
def by_version(tables):
    return {t.version: t for t in tables}


def problems(code: str, tables) -> list[check.Problem]:
    return check.problems_in_source(textwrap.dedent(code), "snippet.py", tables)


def flagged(code: str, tables) -> set[str]:
    return {p.name for p in problems(code, tables)}


# --- the committed tables ---------------------------------------------------------------------------------------


def test_tables_cover_jetpack6_and_tensorrt11(by_version):
    assert "10.3.0" in by_version
    assert any(t.major == 11 for t in by_version.values())


def test_table_files_are_small_and_hold_only_identifiers():
    for path in check.TABLE_DIR.glob("tensorrt-*.txt"):
        assert path.stat().st_size < 200_000, path
        entries = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
        assert len(entries) > 500, path
        for entry in entries:
            assert check.IDENTIFIER.fullmatch(entry.removeprefix("~")), (path, entry)
        # mangled C++ names are kept only as tail-merge hosts, never as API names
        assert "N8nvinfer17ILoggerE" not in entries


BOTH = [
    "execute_async_v3",
    "STRONGLY_TYPED",
    "set_tensor_address",
    "set_input_shape",
    "num_io_tensors",
    "get_tensor_name",
    "build_serialized_network",
    "create_timing_cache",
    "set_memory_pool_limit",
    "OnnxParser",
    "NetworkDefinitionCreationFlag",
    "deserialize_cuda_engine",
]
ONLY_10 = ["FP16", "IInt8EntropyCalibrator2", "int8_calibrator", "EXPLICIT_BATCH", "platform_has_fast_fp16"]


@pytest.mark.parametrize("name", BOTH)
def test_known_fact_registered_in_both_versions(name, tables):
    for table in tables:
        assert table.evidence(name) == "registered", (table.version, name)


@pytest.mark.parametrize("name", ONLY_10)
def test_known_fact_registered_in_10_only(name, tables):
    for table in tables:
        assert table.has(name) == (table.major == 10), (table.version, name, table.evidence(name))


def test_fp16_is_not_hidden_in_any_11x_string(by_version):
    """FP16 in 11.x would only be a docstring word: not a tail of BF16 or of any other string."""
    t11 = next(t for t in by_version.values() if t.major == 11)
    assert "BF16" in t11.names
    assert t11.evidence("FP16") is None
    assert not any(s.endswith("FP16") for s in t11.names | t11.hosts)


def test_tail_merged_names_count_as_weak_evidence(tables):
    for table in tables:
        assert table.evidence("INT8") == "tail-merged into the registered name 'UINT8' (weak evidence)"
        assert "weak evidence" in table.evidence("Logger")
        assert "weak evidence" in table.evidence("Runtime")
    set_dynamic_range = {t.major: t.evidence("set_dynamic_range") for t in tables}
    assert "reset_dynamic_range" in set_dynamic_range[10]
    assert set_dynamic_range[11] is None


def test_weak_evidence_needs_an_identifier_tail():
    table = check.parse_table("UINT8\n~Foo\n", "9.0")
    assert table.evidence("UINT8") == "registered"
    assert "weak" in table.evidence("INT8")
    assert "weak" in table.evidence("Foo")
    assert table.evidence("8") is None  # not an identifier
    assert table.evidence("UINT") is None  # prefixes are not merged


# --- the checker on snippets --------------------------------------------------------------------------------------


def test_removed_builder_flags_and_calibrator_are_flagged(tables):
    code = """
        import tensorrt as trt

        def build(builder, config, calib):
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = calib
            return trt.IInt8EntropyCalibrator2
    """
    found = problems(code, tables)
    assert {(p.name, p.line) for p in found} == {
        ("FP16", 5),
        ("BuilderFlag.FP16", 5),
        ("BuilderFlag.INT8", 6),
        ("int8_calibrator", 7),
        ("IInt8EntropyCalibrator2", 8),
    }
    message = str(next(p for p in found if p.name == "FP16"))
    assert message.startswith("snippet.py:5: FP16: only in TensorRT 10.3.0, missing in 11.")


def test_apis_removed_before_10_are_flagged_on_any_object(tables):
    code = """
        def infer(engine, context, bindings, stream, builder, network, config):
            n = engine.num_bindings
            shape = engine.get_binding_shape(0)
            context.execute_async_v2(bindings, stream)
            context.execute_async(1, bindings, stream)
            config.max_workspace_size = 1 << 30
            return builder.build_engine(network, config), n, shape
    """
    assert flagged(code, tables) == {
        "num_bindings",
        "get_binding_shape",
        "execute_async_v2",
        "execute_async",
        "max_workspace_size",
        "build_engine",
    }


def test_portable_tensorrt_code_passes(tables):
    code = """
        from __future__ import annotations

        def build_and_run(onnx_bytes: bytes, stream: int, ptrs: dict[str, int]) -> bytes:
            import tensorrt as trt

            logger = trt.Logger(trt.Logger.WARNING)
            builder = trt.Builder(logger)
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(onnx_bytes):
                raise RuntimeError(str(parser.get_error(0)))
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
            profile = builder.create_optimization_profile()
            profile.set_shape("images", (1, 3, 224, 224), (4, 3, 224, 224), (8, 3, 224, 224))
            config.add_optimization_profile(profile)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
            blob = builder.build_serialized_network(network, config)
            engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
            context = engine.create_execution_context()
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    context.set_input_shape(name, (1, 3, 224, 224))
                dtype = trt.nptype(engine.get_tensor_dtype(name))
                context.set_tensor_address(name, ptrs[name])
            context.execute_async_v3(stream)
            major = int(trt.__version__.split(".")[0])
            return bytes(blob), dtype, major, trt.DataType.INT8
    """
    assert problems(code, tables) == []


def test_everyday_python_names_are_not_mistaken_for_tensorrt(tables):
    # `fp16` is only a tail of platform_has_fast_fp16, and write/where/offset are 11.x keyword names
    code = """
        import numpy as np

        def main(args, f, torch):
            if args.fp16 or args.int8:
                f.write(np.where(args.mask, 1, 0).tobytes())
            return torch.cuda.is_available(), args.offset, args.choices
    """
    assert problems(code, tables) == []


def test_unknown_name_on_the_module_is_flagged_but_not_elsewhere(tables):
    code = """
        import tensorrt as trt
        x = trt.Bulder
        y = something.Bulder
    """
    found = problems(code, tables)
    assert [(p.name, p.line) for p in found] == [("Bulder", 3)]
    assert "not a TensorRT name in 10.3.0, 11." in found[0].message


def test_guard_marker_opts_out_one_line_only(tables):
    code = """
        import tensorrt as trt

        def enable_fp16(config):
            if hasattr(trt.BuilderFlag, "FP16"):
                config.set_flag(trt.BuilderFlag.FP16)  # trt-version-guarded: 10.x only, hasattr above
            config.set_flag(trt.BuilderFlag.FP16)
    """
    assert {(p.name, p.line) for p in problems(code, tables)} == {("FP16", 7), ("BuilderFlag.FP16", 7)}


def test_guard_marker_covers_a_multiline_expression(tables):
    code = """
        import tensorrt as trt
        flag = getattr(
            trt.BuilderFlag, "FP16"
        )  # trt-version-guarded
    """
    assert problems(code, tables) == []


def test_getattr_is_checked_but_probes_are_not(tables):
    code = """
        import tensorrt as trt
        a = hasattr(trt.BuilderFlag, "FP16")
        b = getattr(trt.BuilderFlag, "FP16", None)
        c = getattr(trt.BuilderFlag, "FP16")
    """
    assert {(p.name, p.line) for p in problems(code, tables)} == {("FP16", 5), ("BuilderFlag.FP16", 5)}


def test_aliases_lazy_imports_and_from_imports(tables):
    code = """
        import importlib

        class Backend:
            def __init__(self):
                self._trt = importlib.import_module("tensorrt")
                self.calibrator_base = self._trt.IInt8EntropyCalibrator2

        def flags():
            from tensorrt import BuilderFlag as BF, IInt8MinMaxCalibrator
            return BF.INT8, IInt8MinMaxCalibrator

        def via_helper():
            trt = _load_tensorrt()
            return trt.Logger(min_severity=trt.Logger.ERROR), trt.platform_has_fast_fp16
    """
    assert {(p.name, p.line) for p in problems(code, tables)} == {
        ("IInt8EntropyCalibrator2", 7),
        ("IInt8MinMaxCalibrator", 10),
        ("BuilderFlag.INT8", 11),
        ("platform_has_fast_fp16", 15),
    }


def test_trt_names_used_reports_names_with_lines(tmp_path, tables):
    source = tmp_path / "backend.py"
    source.write_text(
        "import tensorrt as trt\n"
        "def run(context, stream, logger):\n"
        "    flag = trt.BuilderFlag.FP16\n"
        "    context.execute_async_v3(stream)\n"
        "    return trt.Runtime(logger), flag, context.foo\n"
    )
    used = check.trt_names_used(source, tables)
    assert {("BuilderFlag", 3), ("FP16", 3), ("BuilderFlag.FP16", 3), ("execute_async_v3", 4), ("Runtime", 5)} <= used
    assert not any(name == "foo" for name, _ in used)
    assert [(p.name, p.line) for p in check.problems_in_file(source, tables)] == [
        ("BuilderFlag.FP16", 3),
        ("FP16", 3),
    ]


def test_checker_cli_exit_status(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("import tensorrt as trt\nx = trt.BuilderFlag.FP16\n")
    good = tmp_path / "good.py"
    good.write_text("import tensorrt as trt\nx = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED\n")
    assert check.main([str(good)]) == 0
    assert check.main([str(bad)]) == 1
    assert f"{bad}:2: FP16: only in TensorRT 10.3.0" in capsys.readouterr().out
    assert check.main([str(tmp_path / "missing.py")]) == 2


# --- the extraction tool, on a tiny synthetic wheel ----------------------------------------------------------------


def tiny_elf(rodata: bytes) -> bytes:
    """A minimal 64-bit little-endian ELF file with a .rodata and a .shstrtab section."""
    shstrtab = b"\0.rodata\0.shstrtab\0"
    rodata_offset = 64
    shstrtab_offset = rodata_offset + len(rodata)
    shoff = shstrtab_offset + len(shstrtab)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    section = struct.Struct("<IIQQQQIIQQ")
    sections = section.pack(*[0] * 10)
    sections += section.pack(1, 1, 2, 0, rodata_offset, len(rodata), 0, 0, 1, 0)
    sections += section.pack(9, 3, 0, 0, shstrtab_offset, len(shstrtab), 0, 0, 1, 0)
    return header + rodata + shstrtab + sections


def test_extract_from_a_wheel_then_check_against_it(tmp_path):
    tool = load_trt_names_tool()
    rodata = b"\0".join(
        [
            b"",
            b"Builder",  # registered
            b"UINT8",  # INT8 merged into it
            b"Enable FP16 layer selection",  # docstring words are not names
            b"N8nvinfer17ILoggerE",  # mangled: host only
            b"see BuilderFlag.STRONGLY_TYPED",  # tail of a docstring: host only
            b"",
        ]
    )
    wheel = tmp_path / "tensorrt_cu12_bindings-9.9.0-cp311-none-manylinux_2_17_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tensorrt_bindings/tensorrt.so", tiny_elf(rodata))
        archive.writestr("tensorrt_bindings/__init__.py", '__version__ = "9.9.0"\ndef volume(x):\n    return 1\n')
        archive.writestr("tensorrt_bindings/plugin/__init__.py", "")
        archive.writestr("tensorrt_cu12_bindings-9.9.0.dist-info/METADATA", "Name: x\nVersion: 9.9.0\n")
    out = tmp_path / "tables"
    assert tool.main(["extract", str(wheel), "--out", str(out)]) == 0
    text = (out / "tensorrt-9.9.0.txt").read_text()
    entries = [line for line in text.splitlines() if not line.startswith("#")]
    names = ["Builder", "UINT8", "__version__", "plugin", "volume"]
    assert entries == names + ["~N8nvinfer17ILoggerE", "~STRONGLY_TYPED", "~selection"]

    (table,) = check.load_tables(out)
    assert table.version == "9.9.0"
    assert table.evidence("Builder") == "registered"
    assert "weak" in table.evidence("INT8")
    assert "weak" in table.evidence("STRONGLY_TYPED")
    assert "weak" in table.evidence("ILoggerE")  # the weak rule is only as good as the strings it is given
    assert table.evidence("FP16") is None
    assert table.evidence("Enable") is None


def test_extract_rejects_a_wheel_without_tensorrt_module(tmp_path, capsys):
    tool = load_trt_names_tool()
    wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other-1.0.dist-info/METADATA", "Name: other\nVersion: 1.0\n")
    assert tool.main(["extract", str(wheel), "--out", str(tmp_path / "t")]) == 2
    assert "expected one tensorrt*.so" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


# --- the project's TensorRT code ----------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", TENSORRT_SOURCES)
def test_project_tensorrt_code_uses_only_names_of_both_versions(relative, tables):
    path = REPO / relative
    if not path.exists():
        pytest.skip(f"{relative} does not exist yet (being written); it must pass this check before merging")
    found = check.problems_in_file(path, tables)
    assert not found, "TensorRT names missing in a supported version:\n" + "\n".join(map(str, found))


# --- the install extras -------------------------------------------------------------------------------------------


def setup_extras() -> dict[str, list[str]]:
    """``extras_require`` as setup.py passes it to setuptools (setup() captured, nothing built or downloaded)."""
    import runpy

    import setuptools

    captured: dict = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(str(REPO / "setup.py"))
    finally:
        setuptools.setup = real
    return captured["extras_require"]


@pytest.mark.parametrize("extra, cuda_major", [("tensorrt", 12), ("tensorrt-cu12", 12), ("tensorrt-cu13", 13),
                                               ("jetson", 12)])
def test_extras_keep_tensorrt_and_cuda_python_on_one_cuda_major(extra, cuda_major):
    """Unpinned, pip resolved TensorRT 11 for CUDA 13 and cuda-python 13 (driver >= 580) on CUDA-12 hosts and
    JetPack 6, where nothing then reached the GPU. Each extra must stay on one CUDA major."""
    from packaging.requirements import Requirement

    reqs = {Requirement(r).name: Requirement(r).specifier for r in setup_extras()[extra]}
    cuda_python = reqs["cuda-python"]
    assert ("12.9.1" in cuda_python, "13.4.4" in cuda_python) == (cuda_major == 12, cuda_major == 13)
    if extra == "jetson":
        assert not any(name.startswith("tensorrt") for name in reqs)  # JetPack's own TensorRT 10.3
        return
    trt = reqs[f"tensorrt-cu{cuda_major}"]
    if cuda_major == 12:
        assert "10.3.0" in trt and "11.4.0.106" not in trt
    else:
        assert "11.4.0.106" in trt
