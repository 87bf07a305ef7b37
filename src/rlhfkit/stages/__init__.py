"""Training stages: one explicit loop each."""

from __future__ import annotations

import logging

from rlhfkit.config import Config

logger = logging.getLogger(__name__)


def run_stage(config: Config) -> dict[str, float]:
    """Run the stage named by `config.finetuning.stage`; return its final statistics."""
    for key in config.ignored_keys:
        from rlhfkit.config import IGNORED_KEYS

        logger.info("note: key '%s' has no effect here (%s)", key, IGNORED_KEYS[key])
    from rlhfkit.run_lock import RunLocks
    from rlhfkit.training.control import StopSignals

    from rlhfkit.hub import resolve_config_paths

    resolve_config_paths(config)  # hub ids -> local snapshot folders
    stage = config.finetuning.stage
    with StopSignals(), RunLocks():  # the output folder's lock, taken by the stage's start_run
        if stage == "sft":
            from rlhfkit.stages.sft import run_sft

            return run_sft(config)
        if stage == "rm":
            from rlhfkit.stages.rm import run_rm

            return run_rm(config)
        from rlhfkit.stages.ppo import run_ppo

        return run_ppo(config)
