"""The testbed: procedural data with planted memorization, and the trainer of the shipped checkpoints."""
