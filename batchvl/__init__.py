"""batchvl: offline batch inference of InternVL vision-language models over large datasets."""

__version__ = "0.1.0"
