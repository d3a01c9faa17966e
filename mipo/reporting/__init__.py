"""Reporting on sweeps: reading job directories, summaries over seeds, plots, aggregation."""
