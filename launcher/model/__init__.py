"""Loading the model a task asks for (LoRA, precision, attention) and routing its batches to the right forward."""
