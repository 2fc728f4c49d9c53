"""Planning before loading: the hardware, the memory plan per device, llama.cpp's own dry run."""
