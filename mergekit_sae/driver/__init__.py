"""The driver every search shares: run context, the step loop, members on disk, checkpoints,
the lock on the output folder, and the executors that score candidates."""
