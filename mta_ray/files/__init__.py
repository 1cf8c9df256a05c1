"""The run folder and what is read from disk: its layout (every file name, once), user sources and tables,
synthetic data, the adapter store, the PEFT format, models, atomic writes."""
