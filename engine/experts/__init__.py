"""Where experts come from: the file (mmap.py), the hot arena (arena.py) and its eviction policies
(policies.py), the cold copies (cold.py), the store that decides per layer (cache.py) by the pure rules
in rules.py, and what it counts (stats.py)."""
