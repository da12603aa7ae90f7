"""Ablation sweeps: run specs and validation (spec), launching (runner), results (report)."""
