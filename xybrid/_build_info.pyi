# Types of the module meson generates from _build_info.py.in.
VERSION: str
LLAMA_CPP_COMMIT: str
NATIVE: bool
CUDA: bool
RPC: bool
BACKEND_DL: bool
BUILD_TYPE: str
