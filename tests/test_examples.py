"""Every YAML under examples/ loads and validates; the README shows the example files as they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhfkit.commands.evaluate import check_eval_config
from rlhfkit.commands.export import check_export_config
from rlhfkit.config import load_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))  # rlhfkit configs (accelerate's own configs are .yml)

# What `rlhfkit demo` fills into examples/demo/*.yaml (see rlhfkit.demo.pipeline).
DEMO_FILLED = {"model_name_or_path": "path/to/model", "dataset_dir": "data", "output_dir": "saves/demo",
               "reward_models": "[{path: saves/rm, type: lora}]", "adapter_name_or_path": "saves/sft"}


def _overrides(path: Path, values: dict) -> list[str]:
    if path.parent.name != "demo":
        return []
    filled = dict(DEMO_FILLED)
    if values.get("stage") != "ppo":
        filled.pop("reward_models")
        filled.pop("adapter_name_or_path")
    return [f"{key}={value}" for key, value in filled.items() if key not in values]


def test_there_are_examples():
    names = {p.relative_to(ROOT / "examples").as_posix() for p in EXAMPLES}
    assert {"sft.yaml", "rm.yaml", "ppo.yaml", "export.yaml", "eval.yaml", "demo/ppo.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.relative_to(ROOT / "examples").as_posix())
def test_example_validates(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative output folders resolve to places that do not exist
    values = read_yaml(path)
    if path.stem == "export":
        config = load_config(path, check=False)
        check_export_config(config)
        assert config.export.export_dir and config.model.adapter_name_or_path
    elif path.stem == "eval":
        config = load_config(path, check=False)
        check_eval_config(config)
        assert config.ppo.reward_models or config.ppo.reward_model
    else:
        config = load_config(path, _overrides(path, values), check=True)
        assert config.finetuning.stage == values["stage"]
    assert not config.ignored_keys, f"{path.name} uses keys without effect: {config.ignored_keys}"


def test_readme_shows_the_example_files():
    readme = (ROOT / "README.md").read_text()
    shown = re.findall(r"```yaml\n# (examples/\S+\.yaml)\n(.*?)```", readme, flags=re.S)
    assert shown, "README shows no example file"
    for name, body in shown:
        lines = (ROOT / name).read_text().splitlines()
        content = [line for line in lines if not line.startswith("#")]  # the file's own header comment aside
        assert body.splitlines() == content, f"README's copy of {name} differs from the file"
