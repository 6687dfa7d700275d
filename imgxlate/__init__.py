"""imgxlate: image-to-image models at cluster scale.

    import imgxlate
    summary = imgxlate.translate("s3://archive/scans", "s3://archive/x2", model="sr-x2")

``imgxlate.translate`` (:mod:`imgxlate.api`) runs the batch job; :class:`imgxlate.data.MapImages` is one stage of
a Ray Data pipeline of your own. Importing imgxlate loads neither torch nor Ray: each is loaded when first used.
"""
__version__ = "0.1.0"

__all__ = ["CannotRun", "InputsFailed", "MapImages", "Stopped", "translate"]

from imgxlate.errors import CannotRun, Stopped  # noqa: E402  (no heavy imports)


def translate(src: str, dst: str, model: str, **options) -> dict:
    """Run the batch job; its summary. See :func:`imgxlate.api.translate`."""
    from imgxlate import api

    return api.translate(src, dst, model, **options)


def __getattr__(name: str):
    if name == "MapImages":
        from imgxlate.data import MapImages

        return MapImages
    if name == "InputsFailed":
        from imgxlate.api import InputsFailed

        return InputsFailed
    raise AttributeError(f"module 'imgxlate' has no attribute {name!r}")
