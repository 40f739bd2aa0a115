"""LMDeploy's image placeholder, as `lmdeploy.vl.constants` names it.

batchvl reads it wherever it reads `<image>`: one per image, in order, in a prompt or a message's text.
"""

from batchvl.prepare.prompt import LMDEPLOY_IMAGE_TOKEN

IMAGE_TOKEN: str = LMDEPLOY_IMAGE_TOKEN  # '<IMAGE_TOKEN>'

__all__ = ["IMAGE_TOKEN"]
