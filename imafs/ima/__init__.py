"""The integrity engine: pure Python, no FUSE imports.

One module per concern, named as in the kernel's security/integrity/ima/.
"""
