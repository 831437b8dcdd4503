"""A gateway for image-generation model servers (see README.md and design.md)."""

__version__ = "0.1.0"
