"""The real-data study: its driver (cross-banking, validation-chosen settings) and its report."""
