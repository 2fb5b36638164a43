"""Training stages and their objectives, optimizer and schedule, the compiled step, checkpointer, metrics."""
