from .._placeholder import Unavailable, make_getattr
from . import functional, v2  # noqa: F401
from .functional import InterpolationMode  # noqa: F401


class Compose(Unavailable):
    pass


class Lambda(Unavailable):
    pass


class Resize(Unavailable):
    pass


class ToTensor(Unavailable):
    pass


class Normalize(Unavailable):
    pass


__getattr__ = make_getattr(__name__)  # any other transform class
