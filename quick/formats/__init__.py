"""Ground floor: quantized-weight types, the W4A8 number format, packed layouts and the interleave."""
