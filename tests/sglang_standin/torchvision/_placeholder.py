class Unavailable:
    """Placeholder object: constructing works, calling raises."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {type(self).__name__} is not available")


def make_getattr(modname):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():  # class-like name: an unusable placeholder class
            return type(name, (Unavailable,), {"__module__": modname})

        def _unavailable(*args, **kwargs):
            raise RuntimeError(f"torchvision stand-in: {modname}.{name} is not available")

        _unavailable.__name__ = name
        return _unavailable

    return __getattr__
