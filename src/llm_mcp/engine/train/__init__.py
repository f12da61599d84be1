"""A training run: its engine choices, TRL's SFTTrainer with progress and stop callbacks, sealed checkpoints and resume."""
