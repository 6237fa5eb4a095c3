"""imagerl: reinforcement-learning post-training of image generators with the GRPO family."""

__version__ = "0.1.0"
