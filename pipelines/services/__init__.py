"""Processes the pipeline starts and ends with it: the embedded teacher (llama.cpp) and the helpers that tie a
child process's life to its parent's."""
