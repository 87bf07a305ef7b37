"""Where weights are read from: safetensors files, checked whole before any library reads them;
never a pickle (`pytorch_model.bin`, `adapter_model.bin`, ...), which can run code when loaded."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from rlhfkit.errors import fail, one_line

MODEL_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (its header must parse and its tensors cover the
    file exactly), or None; reads the header only."""
    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        return one_line(err)
    return None


def check_safetensors(path: Path) -> None:
    """Refuse, naming `path`, a file that is missing, truncated or not safetensors."""
    if not path.is_file():
        raise fail(f"{path} not found; the folder is incomplete, copy or save it again")
    problem = safetensors_problem(path)
    if problem is not None:
        raise fail(f"{path} is damaged or not a safetensors file ({problem}); copy or save it again")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; one line naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise fail(f"{path} is not valid JSON ({str(err).splitlines()[0]}); copy or save it again") from None
    if not isinstance(value, dict):
        raise fail(f"{path} must hold a JSON object; copy or save it again")
    return value


def _refuse_pickles(folder: Path, names: list[str], wanted: str) -> None:
    for name in names:
        if (folder / name).is_file():
            raise fail(f"{folder / name} holds pickled weights, which rlhfkit never loads (unpickling can run "
                       f"code); convert them to {wanted} where you trust the file (load, then save as safetensors)")


def indexed_weight_files(folder: Path) -> list[Path]:
    """A model folder's safetensors files as saved: the shards its index names, or model.safetensors;
    [] when it has neither."""
    index = folder / MODEL_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise fail(f"{index} has no weight_map; copy or save the model again")
        return [folder / name for name in sorted(set(map(str, weight_map.values())))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def model_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a local model folder (`indexed_weight_files`, else any), each checked whole.

    A folder whose weights are pickles only is refused with one line saying to convert them.
    """
    folder = Path(folder)
    files = indexed_weight_files(folder) or sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        _refuse_pickles(folder, pickles, "model.safetensors")
        raise fail(f"{folder} has no model.safetensors (nor {MODEL_INDEX}); it holds no weights rlhfkit can read")
    for path in files:
        check_safetensors(path)
    return files


def check_adapter_weights(folder: str | Path) -> None:
    """A LoRA adapter folder's weights: `adapter_model.safetensors`, whole; a pickled adapter is refused."""
    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        _refuse_pickles(folder, ["adapter_model.bin", "adapter_model.pt", "adapter_model.pth"], ADAPTER_WEIGHTS)
    check_safetensors(folder / ADAPTER_WEIGHTS)
