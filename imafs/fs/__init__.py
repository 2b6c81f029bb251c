"""The FUSE adapter (pyfuse3 + trio). Thin: no IMA logic lives here."""
