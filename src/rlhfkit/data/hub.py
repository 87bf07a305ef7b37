"""Datasets on the Hugging Face Hub (`hf_hub_url` in dataset_info.json), read through `datasets.load_dataset`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from rlhfkit.data.files import Row
from rlhfkit.errors import fail


@dataclass
class HubDataset:
    """Where a dataset_info.json entry's rows come from on the Hub, as LLaMA-Factory reads it."""

    repo_id: str
    """`hf_hub_url`: the dataset repository id."""
    subset: str | None = None
    """`subset`: the configuration name (load_dataset's `name`)."""
    split: str = "train"
    """`split`: the split to read."""
    folder: str | None = None
    """`folder`: a folder inside the repository (load_dataset's `data_dir`)."""
    cache_dir: str | None = None
    """The config's `cache_dir`."""
    token: str | None = None
    """The config's `hf_hub_token`."""


def hub_rows(hub: HubDataset) -> Iterator[Row]:
    """Yield `(source, row)` for each row of the Hub dataset; failures are one line naming the id."""
    try:
        import datasets
    except ImportError:
        raise fail(f"dataset {hub.repo_id!r} (hf_hub_url) needs the datasets package: pip install datasets") from None
    try:
        table = datasets.load_dataset(path=hub.repo_id, name=hub.subset, data_dir=hub.folder, split=hub.split,
                                      cache_dir=hub.cache_dir, token=hub.token)
    except ConnectionError:
        raise fail(f"dataset {hub.repo_id!r} (hf_hub_url) is not in the datasets cache and the Hugging Face Hub "
                   f"cannot be reached (offline); run once where the Hub is reachable, or download it with "
                   f"`hf download {hub.repo_id} --repo-type dataset --local-dir DIR` and set file_name to DIR") from None
    except Exception as err:  # datasets raises many types: not found, bad split, gated, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise fail(f"dataset {hub.repo_id!r} (hf_hub_url): cannot load split {hub.split!r} ({first}); check "
                   "hf_hub_url, subset, split and folder in dataset_info.json, or hf_hub_token") from None
    for index, row in enumerate(table, start=1):
        yield f"{hub.repo_id} ({hub.split}) row {index}", dict(row)
