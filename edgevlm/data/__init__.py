"""Image decoding and preprocessing (numpy + Pillow, no torch), calibration sets, datasets."""
