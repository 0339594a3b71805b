"""The training loop, learning-rate schedule, hooks and checkpoint orchestration."""
