"""Units shared by every fedmoe package (the device runtime imports nothing else, so they live here)."""

MIB = 1 << 20  # bytes in one mebibyte
