"""MIPO: Mutual Information Preference Optimization (arXiv 2603.19294). See README.md."""
