"""Stub of mmcv for the official AFA code: only ``mmcv.cnn.ConvModule`` (see README.md)."""
