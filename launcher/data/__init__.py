"""Rows in, batches out, whatever the task: sources, the label space, training order, and loaders."""
