"""In-process engines behind two narrow interfaces (engines/base.py): llama.cpp for GGUF, PyTorch for HF checkpoints."""
