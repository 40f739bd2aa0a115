"""Image helpers under LMDeploy's names (`lmdeploy.vl`), on batchvl's own media code."""

from batchvl.vl.utils import encode_image_base64, load_image

__all__ = ["encode_image_base64", "load_image"]
