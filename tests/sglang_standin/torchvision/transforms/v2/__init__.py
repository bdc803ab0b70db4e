from ..._placeholder import make_getattr
from . import functional  # noqa: F401

__getattr__ = make_getattr(__name__)
