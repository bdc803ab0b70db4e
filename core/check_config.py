"""``flexkv check-config``: load a config as the engines would, print it resolved, and check it fits this machine.

Exit status 0 when the config is valid and fits, 1 (with the reason on stderr) when it does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from .config import MODEL_PRESETS, FlexKVConfig, ModelConfig, format_bytes, model_preset
from .config_file import _read_file as read_config_file
from .config_file import env_override_names, load_config, resolve_config_path, upstream_keys_in
from .config_keys import section_keys
from .engine_requests import block_size_for_engine
from .env_refs import expand_string
from .errors import ConfigError
from .remote_settings import remote_settings
from .resources import check_resources, describe
from .upstream import explain


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexkv check-config",
        description="Load a FlexKV config (JSON or YAML, FLEXKV_* environment overrides applied), print every key "
                    "resolved, the bytes of a block and of each tier, and check that the tiers fit this machine.",
    )
    parser.add_argument("path", nargs="?", default=None,
                        help="config file (default: $FLEXKV_CONFIG_PATH, else the built-in defaults)")
    parser.add_argument("--model", metavar="PRESET",
                        help=f"model shape preset: {', '.join(sorted(MODEL_PRESETS))}")
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--num-kv-heads", type=int, help="KV heads of the whole model (all TP ranks)")
    parser.add_argument("--head-size", type=int)
    parser.add_argument("--dtype", help="bfloat16, float16, float32, fp8, float8_e4m3fn, int8, ...")
    parser.add_argument("--tp-size", type=int)
    parser.add_argument("--dp-size", type=int)
    parser.add_argument("--use-mla", action=argparse.BooleanOptionalAction, default=None,
                        help="MLA: one latent per token instead of K and V")
    parser.add_argument("--engine", choices=("vllm", "sglang", "trtllm"),
                        help="predict what this engine runs: its block (page) size replaces tokens_per_block")
    parser.add_argument("--block-size", type=int, metavar="N",
                        help="the engine's block size (vLLM --block-size, SGLang --page-size, TRT-LLM "
                             "tokens_per_block); with --engine")
    parser.add_argument("--skip-resources", action="store_true",
                        help="do not compare the sizes with this machine's memory and disks "
                             "(for a config meant for another host)")
    return parser


_SHAPE_FLAGS = ("num_layers", "num_kv_heads", "head_size", "dtype", "tp_size", "dp_size", "use_mla")


def _build_model(args: argparse.Namespace, from_file: ModelConfig | None) -> ModelConfig | None:
    """The file's model_config, then the preset, then single flags; later wins."""
    model = dataclasses.replace(from_file) if from_file is not None else None
    if args.model:
        model = model_preset(args.model)
    flags = {name: getattr(args, name) for name in _SHAPE_FLAGS if getattr(args, name) is not None}
    if not flags:
        return model
    if model is None:
        missing = [f"--{n.replace('_', '-')}" for n in ("num_layers", "num_kv_heads", "head_size") if n not in flags]
        if missing:
            raise ConfigError(f"a model shape needs {', '.join(missing)} too (or --model PRESET, or \"model_config\" "
                              "in the file)", "model_config")
        model = ModelConfig()
    return dataclasses.replace(model, **flags)


def _remote_line(cache_config: object) -> str:
    """Where the remote tier keeps its blocks and its index (a ConfigError when its settings are wrong)."""
    if not getattr(cache_config, "enable_remote", False):
        return ""
    return "\nremote tier: " + remote_settings(cache_config).describe()  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """Run ``flexkv check-config``; return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: argparse already printed why
        return int(exc.code or 0)
    if args.block_size is not None and args.engine is None:
        print("flexkv check-config: error: --block-size needs --engine (vllm, sglang or trtllm)", file=sys.stderr)
        return 1
    try:
        path = resolve_config_path(args.path)
        config = load_config(path)
        model = _build_model(args, config.model_config)
        notes = _engine_notes(args, config)
        if model is not None:
            model.validate()
            config.cache_config.resolved(model)
        none = "(none found: built-in defaults, a 16 GiB CPU tier unless the environment sizes it)"
        print(f"config file: {path if path is not None else none}")
        overrides = env_override_names(os.environ)
        if overrides:
            print(f"environment overrides: {', '.join(overrides)}")
        original = upstream_keys_in(path)
        if original:
            print("keys of the original FlexKV:")
            for where, key in original:
                print(f"  {explain(key)}  [{where}]")
        text = describe(config, model, check_machine=False)
        print(text.removesuffix("\nresources: not checked against this machine") + _remote_line(config.cache_config))
        print(f"this version runs: {_tiers_run(config)}")
        for note in [*notes, *_env_ref_notes(path), _ssd_disk_note(config, model)]:
            if note:
                print(note)
        for warning in predictions(config, _raw_keys(path)):
            print(f"flexkv check-config: warning: {warning}", file=sys.stderr)
        if model is None or args.skip_resources:
            print("resources: not checked against this machine")
            return 0
        problems = check_resources(config.cache_config, model)
        print("resources: fit on this machine" if not problems else
              "resources: DO NOT FIT on this machine (the errors below say why)")
    except ConfigError as err:
        print(f"flexkv check-config: error: {err}", file=sys.stderr)
        return 1
    for problem in problems:  # once, on stderr
        print(f"flexkv check-config: error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _engine_notes(args: argparse.Namespace, config: FlexKVConfig) -> list[str]:
    """With --engine and --block-size: the config replaced by what the engine runs (its block size)."""
    if args.engine is None or args.block_size is None:
        return []
    cache = config.cache_config
    if args.block_size == cache.tokens_per_block:
        return [f"engine: {args.engine} with block size {args.block_size} runs tokens_per_block as configured"]
    quiet = logging.getLogger("flexkv")
    level, quiet.level = quiet.level, logging.ERROR  # the note below says it, once
    try:
        config.cache_config = block_size_for_engine(cache, args.block_size, args.engine, "block size")
    finally:
        quiet.level = level
    return [f"engine: {args.engine} runs tokens_per_block = {args.block_size} (its block size), not "
            f"{cache.tokens_per_block}: the sizes above are what it allocates"]


def _tiers_run(config: FlexKVConfig) -> str:
    c = config.cache_config
    tiers = ["CPU"] + (["SSD"] if c.enable_ssd else []) + (["remote (S3 + Redis)"] if c.enable_remote else [])
    return " + ".join(tiers) + " (tiers in this version: CPU, SSD, remote)"


def _env_ref_notes(path: str | os.PathLike[str] | None) -> list[str]:
    """What each ``${NAME}`` of the file became in this environment (load_config refused an unset one)."""
    if path is None:
        return []
    found: list[str] = []

    def walk(value: object, key: str) -> None:
        if isinstance(value, str) and "${" in value:
            found.append(f"{key} = {expand_string(value, os.environ, key)!r} (the file's {value!r}, expanded "
                         "from this environment: each process expands it from its own)")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")

    walk(read_config_file(Path(path), None), "")
    return found


def _raw_keys(path: str | os.PathLike[str] | None) -> set[str]:
    """The cache_config keys the file itself gives (also in the short form at the top level)."""
    if path is None:
        return set()
    data = read_config_file(Path(path), None)
    keys = set(data.get("cache_config") or {})
    return keys | {k for k in data if k in section_keys("cache_config")}


def ssd_slot_bytes(block_bytes: int, tokens_per_block: int) -> int:
    """Bytes of one SSD slot: a header (4 KiB aligned, with the block's tokens) and the block, 4 KiB aligned
    (csrc/transfer/ssd_block_header.h)."""
    def up(x: int) -> int:
        return (x + 4095) // 4096 * 4096

    return up(88 + 8 * tokens_per_block) + up(block_bytes)


def predictions(config: FlexKVConfig, given: set[str]) -> list[str]:
    """Warnings about what will not run as written: keys that are ignored, a tier the cache refuses, a missing
    SSD directory."""
    c = config.cache_config
    out = []
    if not c.enable_ssd:
        ignored = sorted(given & {"num_ssd_blocks", "ssd_cache_gb", "ssd_cache_dir", "ssd_cache_iouring_entries",
                                  "ssd_cache_iouring_flags"})
        if ignored:
            out.append(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored: enable_ssd is false "
                       "(set \"enable_ssd\": true for an SSD tier)")
    if not c.enable_remote and given & {"num_remote_blocks", "remote_cache_path", "remote_config_custom"}:
        out.append("the remote_* keys are ignored: enable_remote is false (set \"enable_remote\": true for the "
                   "remote tier)")
    for d in c.ssd_cache_dirs if c.enable_ssd else []:
        if not Path(d).exists():
            parent = _existing_parent(d)
            out.append(f"ssd_cache_dir {d!r} does not exist: the cache creates it (owner-only) at start" +
                       ("" if os.access(parent, os.W_OK) else f", which fails: {parent} is not writable"))
    return out


def _ssd_disk_note(config: FlexKVConfig, model: ModelConfig | None) -> str:
    """What the SSD tier's files take on disk (each slot: a header, then the block padded)."""
    c = config.cache_config
    if not c.enable_ssd or model is None:
        return ""
    resolved = c.resolved(model)
    block = model.block_bytes(resolved.tokens_per_block)
    slot = ssd_slot_bytes(block, resolved.tokens_per_block)
    return (f"SSD files on disk: {format_bytes(slot * resolved.num_ssd_blocks)} ({resolved.num_ssd_blocks} slots x "
            f"{format_bytes(slot)}: a {format_bytes(slot - block)} header and padding besides each "
            f"{format_bytes(block)} block)")


def _existing_parent(d: str) -> str:
    p = Path(d).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


if __name__ == "__main__":
    sys.exit(main())
