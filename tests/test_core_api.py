"""The core declares its API (flexkv.core.__all__) and the engine adapters use nothing else of it."""

from __future__ import annotations

import ast
from pathlib import Path

import flexkv.core

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def _core_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of flexkv.core or one of its modules in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flexkv.core"):
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names if a.name.startswith("flexkv.core"))
    return out


def test_adapters_import_only_the_declared_core_api() -> None:
    declared = set(flexkv.core.__all__)
    files = sorted(ADAPTERS.rglob("*.py"))
    assert files
    wrong = []
    for path in files:
        for line, module, names in _core_imports(path):
            if module != "flexkv.core":
                wrong.append(f"{path.relative_to(ADAPTERS)}:{line} imports {module}: use `from flexkv.core import`")
            wrong.extend(f"{path.relative_to(ADAPTERS)}:{line} uses flexkv.core.{n}, not in flexkv.core.__all__"
                         for n in names if n not in declared)
    assert not wrong, "\n".join(wrong)


def test_every_declared_name_exists() -> None:
    for name in flexkv.core.__all__:
        assert hasattr(flexkv.core, name), name


def test_one_block_size_rule_for_every_engine(caplog) -> None:
    from flexkv.core import CacheConfig, ConfigError, block_size_for_engine

    cfg = CacheConfig(tokens_per_block=16, num_cpu_blocks=8)
    assert block_size_for_engine(cfg, 16, "vLLM") is cfg
    with caplog.at_level("WARNING", logger="flexkv"):
        assert block_size_for_engine(cfg, 64, "SGLang", "--page-size").tokens_per_block == 64
        assert block_size_for_engine(cfg, 8, "TensorRT-LLM").tokens_per_block == 8
    assert caplog.text.count("is replaced by") == 2
    try:
        block_size_for_engine(cfg, 24, "vLLM", "block_size")
    except ConfigError as e:
        assert e.key == "cache_config.tokens_per_block" and "set tokens_per_block to 24" in str(e)
    else:
        raise AssertionError("16 and 24 were accepted")


def test_request_namespaces_have_one_order_and_skip_empty_parts() -> None:
    from flexkv.core import request_namespace

    assert request_namespace() == ()
    assert request_namespace(cache_salt="", lora=None) == ()
    assert request_namespace(lora=3, cache_salt="s") == ("salt:s", "lora:3")
    assert request_namespace(tenant="t", lora="a") == ("lora:a", "tenant:t")
