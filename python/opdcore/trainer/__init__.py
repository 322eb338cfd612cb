"""The OPD training system: models, rollouts, teacher scoring, the update, checkpoints and logging."""
