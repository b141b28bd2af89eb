"""Infrastructure: errors, atomic writes, the artefact cache, the process group and memory budget.

Layer 0: imports nothing of keyscope outside this package (and the package's version).
"""
