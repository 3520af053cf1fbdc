"""Typed errors raised by the GLM-4V model package.

Every error names the problem in its message so services can map it to a status code
(INVALID_ARGUMENT for media problems, FAILED_PRECONDITION for checkpoint problems) without
parsing text. Nothing here knows about gRPC or HTTP.
"""

from __future__ import annotations


class GlimpseModelError(Exception):
    """Base class of all errors raised by the model package."""


class ConfigError(GlimpseModelError):
    """The checkpoint's config.json is missing, malformed or inconsistent."""


class UnknownModelTypeError(ConfigError):
    """config.json names a model_type this package does not serve."""


class CheckpointError(GlimpseModelError):
    """A weight file is missing, a tensor is absent, or a tensor has the wrong shape or dtype."""


class MediaError(GlimpseModelError):
    """Media bytes could not be turned into model input (corrupt, truncated, too large, bad aspect)."""


class ImageDecodeError(MediaError):
    """Bytes are not a decodable image in an allowed format."""


class ImageSizeError(MediaError):
    """The image is zero-area, above the pixel limit, or has an aspect ratio above 200."""


class VideoDecodeError(MediaError):
    """The video is corrupt, truncated, empty, or has no decodable frames."""
