"""imafs: Linux IMA in user space, as a FUSE overlay filesystem."""

__version__ = "0.1.0"
