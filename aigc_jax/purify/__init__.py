"""What an unauthorised trainer does to protected images."""

from aigc_jax.purify.transforms import gaussian_blur, jpeg_compress

__all__ = ["gaussian_blur", "jpeg_compress"]
