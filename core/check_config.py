"""``flexkv check-config``: load a config as the engines would, print it resolved, and check it fits this machine.

Exit status 0 when the config is valid and fits, 1 (with the reason on stderr) when it does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .config import MODEL_PRESETS, ModelConfig, model_preset
from .config_file import env_override_names, load_config, resolve_config_path
from .errors import ConfigError
from .remote_settings import remote_settings
from .resources import check_resources, describe


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
    try:
        path = resolve_config_path(args.path)
        config = load_config(path)
        model = _build_model(args, config.model_config)
        if model is not None:
            model.validate()
            config.cache_config.resolved(model)
        print(f"config file: {path if path is not None else '(none: built-in defaults)'}")
        overrides = env_override_names(os.environ)
        if overrides:
            print(f"environment overrides: {', '.join(overrides)}")
        remote = _remote_line(config.cache_config)
        if model is None or args.skip_resources:
            print(describe(config, model, check_machine=False) + remote)
            return 0
        print(describe(config, model) + remote)
        problems = check_resources(config.cache_config, model)
    except ConfigError as err:
        print(f"flexkv check-config: error: {err}", file=sys.stderr)
        return 1
    if problems:
        for problem in problems:
            print(f"flexkv check-config: error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
