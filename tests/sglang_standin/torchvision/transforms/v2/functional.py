from ..._placeholder import make_getattr
from ..functional import InterpolationMode  # noqa: F401

__getattr__ = make_getattr(__name__)
