"""Checkpoints: finding them, reading their configs, and (issue 3) the model families written in batchvl."""
