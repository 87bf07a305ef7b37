"""The Hugging Face Hub: model, adapter and reward-model ids become local snapshot folders; uploads.

A name that is an existing folder is used as it is. A name that is not, and is a valid repository
id (``org/name`` or ``name``), is fetched with huggingface_hub's `snapshot_download` honouring
`cache_dir`, `model_revision` and `hf_hub_token`; with HF_HUB_OFFLINE=1 (or no network) the
cached snapshot is used. Every failure is one line naming the id and what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rlhfkit.errors import fail
from rlhfkit.run_lock import LOCK_FILE

if TYPE_CHECKING:
    from rlhfkit.config import Config, ModelArguments

logger = logging.getLogger(__name__)

# Formats no loader here reads: TensorFlow, Flax, ONNX, GGUF, the original (non-HF) checkpoints.
IGNORED_FILES = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "*.gguf", "original/*", "onnx/*"]

_HUB_IDS: dict[str, str] = {}
"""Snapshot folder -> the hub id it was fetched for, so saved adapters record the id as their base."""


def hub_id_of(path: str | Path) -> str | None:
    """The hub id `path` was fetched for by `resolve`, if any."""
    return _HUB_IDS.get(str(Path(path)))


def looks_like_repo_id(name: str) -> bool:
    """Whether `name` is not an existing path and has the form of a hub repository id."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    if name.count("/") > 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _download_command(repo_id: str, revision: str, cache_dir: str | None, repo_type: str = "model") -> str:
    extra = "" if revision == "main" else f" --revision {revision}"
    extra += f" --cache-dir {cache_dir}" if cache_dir else ""
    extra += " --repo-type dataset" if repo_type == "dataset" else ""
    return f"`hf download {repo_id}{extra}`"


def hub_error(err: Exception, key: str, repo_id: str, revision: str = "main", cache_dir: str | None = None,
              repo_type: str = "model"):
    """The one-line RlhfkitError for a failed hub access to `repo_id` (named by config `key`)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{key} {repo_id!r}"
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or isinstance(err, ConnectionError):
        cache = f" ({cache_dir})" if cache_dir else ""
        return fail(f"{where} is not a local folder nor in the Hugging Face Hub cache{cache}, and the Hub cannot be "
                    f"reached (offline); download it with {_download_command(repo_id, revision, cache_dir, repo_type)} "
                    f"where the Hub is reachable, or set {key} to a local folder")
    if isinstance(err, GatedRepoError):
        return fail(f"{where} is gated: accept its conditions on https://huggingface.co/{repo_id} and set "
                    "hf_hub_token (or HF_TOKEN) to a token of that account")
    if isinstance(err, RepositoryNotFoundError):
        return fail(f"{where} is neither a local folder nor a repository on the Hugging Face Hub (a private one "
                    "needs hf_hub_token); check the name or path")
    if isinstance(err, RevisionNotFoundError):
        return fail(f"{where} has no revision {revision!r}; check model_revision")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return fail(f"{where}: Hugging Face Hub access failed ({first}); check the id, hf_hub_token and the network, "
                f"or set {key} to a local folder")


def _ignore_patterns(repo_id: str, revision: str, token: str | None) -> list[str]:
    """IGNORED_FILES, plus PyTorch pickles when the repository also has safetensors (online only)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return IGNORED_FILES
    try:  # one request, no retries (snapshot_download makes the same one)
        files = [s.rfilename for s in HfApi(token=token).model_info(repo_id, revision=revision).siblings or []]
    except Exception:  # snapshot_download reports the failure (or finds the cache)
        return IGNORED_FILES
    if any(name.endswith(".safetensors") for name in files):
        return IGNORED_FILES + ["pytorch_model*.bin", "adapter_model.bin"]
    return IGNORED_FILES


def resolve(name: str, key: str, model_args: "ModelArguments") -> str:
    """`name` as a local folder: itself if it is one (or not a hub id), else its hub snapshot."""
    if not looks_like_repo_id(name):
        return name
    from huggingface_hub import constants, snapshot_download

    revision = model_args.model_revision or "main"
    try:
        # local_files_only when offline: huggingface_hub 1.x otherwise tries the network for a pinned
        # commit (a revision that needs no lookup) and fails instead of reading its cached snapshot
        folder = snapshot_download(
            name, revision=revision, cache_dir=model_args.cache_dir, token=model_args.hf_hub_token,
            ignore_patterns=_ignore_patterns(name, revision, model_args.hf_hub_token),
            local_files_only=bool(constants.HF_HUB_OFFLINE),
        )
    except Exception as err:  # huggingface_hub raises OSError, ValueError and HTTP errors
        raise hub_error(err, key, name, revision, model_args.cache_dir) from None
    logger.info("%s %s: hub snapshot %s", key, name, folder)
    _HUB_IDS[str(Path(folder))] = name
    return folder


def _resolve_list(value: str | None, key: str, model_args: "ModelArguments") -> str | None:
    if not value:
        return value
    return ",".join(resolve(part.strip(), key, model_args) for part in value.split(",") if part.strip())


def resolve_model_args(model_args: "ModelArguments") -> None:
    """In place: model_name_or_path and adapter_name_or_path as local folders."""
    if model_args.model_name_or_path:
        model_args.model_name_or_path = resolve(model_args.model_name_or_path, "model_name_or_path", model_args)
    model_args.adapter_name_or_path = _resolve_list(model_args.adapter_name_or_path, "adapter_name_or_path",
                                                    model_args)


def resolve_config_paths(config: "Config") -> None:
    """In place: every model, adapter and reward-model name of `config` as a local folder."""
    m, p = config.model, config.ppo
    resolve_model_args(m)
    p.ref_model = _resolve_list(p.ref_model, "ref_model", m)
    p.ref_model_adapters = _resolve_list(p.ref_model_adapters, "ref_model_adapters", m)
    if p.reward_model and p.reward_model_type in ("lora", "full"):
        p.reward_model = resolve(p.reward_model, "reward_model", m)
    for index, entry in enumerate(p.reward_models or []):
        if isinstance(entry, dict) and entry.get("type", "lora") in ("lora", "full") and "path" in entry:
            entry["path"] = resolve(str(entry["path"]), f"reward_models[{index}].path", m)


def push_folder(folder: str | Path, repo_id: str, token: str | None, key: str, private: bool | None = None,
                ignore_patterns: list[str] | None = None) -> str:
    """Create `repo_id` (if needed) and upload `folder` to it, never its run lock (held during the
    upload); return the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                          ignore_patterns=[*(ignore_patterns or []), LOCK_FILE],
                          commit_message="Upload with rlhfkit")
    except Exception as err:  # network, permission, offline mode
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        if isinstance(err, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError)):
            raise fail(f"{key} {repo_id!r}: cannot upload {folder}, the Hugging Face Hub cannot be reached (offline); "
                       f"upload it later with `hf upload {repo_id} {folder}`") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise fail(f"{key} {repo_id!r}: upload of {folder} failed ({first}); check hf_hub_token (a write token) and "
                   f"the repository name, or upload later with `hf upload {repo_id} {folder}`") from None
    logger.info("uploaded %s to %s", folder, url)
    return str(url)
