"""Helpers the tests share (not tests): see docs/development.md."""
