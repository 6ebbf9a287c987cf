"""Our patches to the llama.cpp vendored in the pinned llama-cpp-python sdist, and their build."""
