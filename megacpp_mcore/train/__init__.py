"""Training: the hook contract both loops call, the CPU loop, metering, FLOPs, data."""
