"""Independent yardsticks the tests compare the product against; nothing here imports `blend`."""
