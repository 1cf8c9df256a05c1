"""The pipeline stages (prepare, embed, cluster, bank, personalize, evaluate, export) and their runner:
siblings that read and write the run folder through files.layout, never each other."""
