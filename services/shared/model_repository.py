"""Reading a Triton model repository: which models ship a given file, and a model's input names.

Services that serve something per model (a tokenizer.json, a preprocess.json) discover it here, from
`MAAS_MODEL_REPOSITORY` plus an optional extra directory laid out the same way (<name>/<file>).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.shared.config import ConfigError, env

DEFAULT_MODEL_REPOSITORY = "model_repository"


def add_model_repository_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path(env("MAAS_MODEL_REPOSITORY", DEFAULT_MODEL_REPOSITORY)),
        help="Triton model repository (MAAS_MODEL_REPOSITORY)",
    )


def models_with(filename: str, *directories: Path | None) -> dict[str, Path]:
    """{model name: path} for every <dir>/<model>/<filename>; a later directory wins on a name clash."""
    found: dict[str, Path] = {}
    for directory in directories:
        if directory is None or not directory.is_dir():
            continue
        for path in sorted(directory.glob(f"*/{filename}")):
            if path.is_file():
                found[path.parent.name] = path
    return found


def read_model_config(config_path: Path, *, allow_unknown_fields: bool = False):
    """Triton's own ModelConfig message (as shipped with tritonclient) parsed from a config.pbtxt.

    Raises ConfigError naming the file when it is unreadable text or not a valid config. Readers of
    configs written by others pass allow_unknown_fields (a newer Triton's fields); validators do not.
    """
    # Imported late: tritonclient's protos are slow to load.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(
            config_path.read_text(), model_config_pb2.ModelConfig(), allow_unknown_field=allow_unknown_fields
        )
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path.name} does not parse: {exc}") from None


def model_config(model_dir: Path):
    """<model_dir>/config.pbtxt as a ModelConfig; None without a config."""
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        return None
    try:
        return read_model_config(config_path, allow_unknown_fields=True)
    except ConfigError as exc:
        raise ConfigError(f"{config_path.parent}/{exc}") from None


def model_input_names(model_dir: Path) -> list[str] | None:
    """Input tensor names from <model_dir>/config.pbtxt, in declared order; None without a config."""
    config = model_config(model_dir)
    return None if config is None else [tensor.name for tensor in config.input]
