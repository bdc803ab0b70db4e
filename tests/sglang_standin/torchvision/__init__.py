"""Import-only stand-in for torchvision (CPU CI for sglang imports).

PyPI torchvision wheels do not load against the CPU torch build used here, and
nothing exercised by the FlexKV/HiCache tests uses torchvision. But:

* sglang imports ``torchvision.transforms`` (as T) and
  ``torchvision.transforms.functional.InterpolationMode`` at module level in
  sglang/srt/multimodal/internvl_utils.py, which every mem_cache module pulls in
  (memory_pool -> sglang.srt.configs -> nano_nemotron_vl -> internvl_utils).
* once a ``torchvision`` package is findable, transformers'
  ``is_torchvision_available()`` (a bare importlib.util.find_spec check) turns
  true and transformers.image_utils / image_processing_utils /
  image_processing_backends then import ``torchvision.io.{ImageReadMode,
  decode_image}``, ``torchvision.transforms.{InterpolationMode}``,
  ``torchvision.transforms.functional.pil_to_tensor`` and
  ``torchvision.transforms.v2.functional`` (as tvF) at module level.

Names are provided as placeholders: importing works, calling raises.
"""
__version__ = "0.0.0+standin"

from . import io, transforms  # noqa: F401,E402
