"""One module per paper artefact: run the analysis end to end and write its figures, tables and CSVs.

These sit above the analysis and editing modules and below the CLI, which only parses arguments and prints.
"""
