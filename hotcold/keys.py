"""GGUF metadata keys hotcold adds to the files it writes (llama.cpp's own keys are gguf.Keys).

llama.cpp ignores keys it does not know, so these keep converted files loadable by it.
"""

# sha256 over the main file's expert tensors (names, types, shapes and bytes, in file order).
EXPERTS_SHA256 = "hotcold.experts.sha256"
# In OUT.cold.gguf: the EXPERTS_SHA256 of the main file these cold copies belong to, and their type.
COLD_OF = "hotcold.cold.experts_of"
COLD_TYPE = "hotcold.cold.type"
