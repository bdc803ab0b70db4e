import enum

from ._placeholder import make_getattr


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4
    RGBA = 4


__getattr__ = make_getattr(__name__)  # decode_image, decode_jpeg, read_video, ...
