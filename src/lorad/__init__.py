"""lorad: a daemon for continuous LoRA learning from guard verdicts."""

__version__ = "0.1.0"
