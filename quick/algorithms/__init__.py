"""Quantization algorithms over the formats: round-to-nearest, AWQ, QQQ (W4A8), and their calibration."""
