"""Training stages: one explicit loop each."""

from __future__ import annotations

import logging

from rlhfkit.config import Config

logger = logging.getLogger(__name__)


def run_stage(config: Config) -> dict[str, float]:
    """Run the stage named by `config.finetuning.stage`; return its final statistics."""
    from rlhfkit.config.arguments import DEFAULT_ONLY_KEYS, IGNORED_KEYS

    for key in config.ignored_keys:
        logger.info("note: key '%s' has no effect here (%s)", key,
                    IGNORED_KEYS[key] if key in IGNORED_KEYS else DEFAULT_ONLY_KEYS[key][1])
    from rlhfkit.hub import resolve_config_paths
    from rlhfkit.run_lock import RunLocks
    from rlhfkit.training.control import StopSignals

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
